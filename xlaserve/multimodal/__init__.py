"""Vision-language models: images in prompts (processor, encoder cache, placeholder merging).

The host side (`inputs`, `placement`) is device-free; `processor` runs transformers' image
processors; `encoder` runs the vision tower (jitted per tile bucket) and caches its outputs.
"""
