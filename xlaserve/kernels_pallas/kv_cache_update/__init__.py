from xlaserve.kernels_pallas.kv_cache_update.reference import kv_cache_update

__all__ = ["kv_cache_update"]
