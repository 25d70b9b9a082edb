"""The one exception a row raises when it cannot run here, for a reason that is not a failure."""


class RowUnavailable(Exception):
    """An optional peer that is not installed, a keyword our optimizers do not take yet: svi-bench lists
    the row as skipped with this message (no traceback) and goes on with the others."""
