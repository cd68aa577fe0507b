"""The Triton kernels (on CUDA tensors, or on CPU tensors in Triton's interpreter); ``common`` holds what
they share."""
