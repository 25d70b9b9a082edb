import os

# Triton reads TRITON_INTERPRET when its kernels are defined, so this must run before anything
# imports triton. Without a GPU the Triton kernels run on CPU tensors through the interpreter;
# with one they are compiled and tested on CUDA tensors.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
