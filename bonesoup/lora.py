"""``bonesoup.lora``: LoRA backbones (the public face of bonesoup.merge.lora and bonesoup.merge.adapter_soup).

>>> from bonesoup.lora import load_adapters, mixture_adapter, AdapterSoup
"""

from bonesoup.merge.adapter_soup import AdapterSoup, adapter_soup_of
from bonesoup.merge.lora import (
    LoraAdapter,
    LoraModule,
    check_compatible,
    is_adapter_dir,
    load_adapter,
    load_adapters,
    mixture_adapter,
)

__all__ = ["AdapterSoup", "adapter_soup_of", "LoraAdapter", "LoraModule", "check_compatible", "is_adapter_dir",
           "load_adapter", "load_adapters", "mixture_adapter"]
