"""The ops the fused forward is written against, chatstream's C kernels and their build."""
