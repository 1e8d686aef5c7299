"""Neural Low-rank Adapter Search: elastic-rank LoRA super-adapters on stock PEFT."""

from .config import (
    ELASTIC_CONFIG_FILE,
    elastic_adapter_config,
    select_ranks,
    write_elastic_adapter_config,
)
from .controller import STATS_FILE, ElasticRankController, SearchDimension, nls_rank_mask
from .extract import extract_sub_adapter

__all__ = [
    "ELASTIC_CONFIG_FILE",
    "STATS_FILE",
    "ElasticRankController",
    "SearchDimension",
    "elastic_adapter_config",
    "extract_sub_adapter",
    "nls_rank_mask",
    "select_ranks",
    "write_elastic_adapter_config",
]
