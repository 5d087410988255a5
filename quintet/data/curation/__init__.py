"""Aurora-M style data curation as datatrove pipelines (see docs/data.md).

from quintet.data.curation import curate
result = curate("configs/curation-demo.toml", out_dir="runs/curation", data_root="runs/demo-corpus")
print(result.stats["output"])
"""

from quintet.data.curation.config import CurationConfig, load_config
from quintet.data.curation.dedup import DedupSettings
from quintet.data.curation.language import CodeFilter, LanguageFilter
from quintet.data.curation.numbers import NumberHeavyFilter
from quintet.data.curation.pii import PIIRedactor, redact_pii
from quintet.data.curation.pipeline import CurationResult, build_stages, curate, curation_report
from quintet.data.curation.quality import QualityFilter
from quintet.data.curation.readers import (
    CurationInputError,
    JsonlDocumentReader,
    ParquetDocumentReader,
    TextFolderReader,
)
from quintet.data.curation.toxicity import ToxicityFilter
from quintet.errors import ConfigError

__all__ = [
    "CodeFilter",
    "ConfigError",
    "CurationConfig",
    "CurationInputError",
    "CurationResult",
    "DedupSettings",
    "JsonlDocumentReader",
    "LanguageFilter",
    "NumberHeavyFilter",
    "PIIRedactor",
    "ParquetDocumentReader",
    "QualityFilter",
    "TextFolderReader",
    "ToxicityFilter",
    "build_stages",
    "curate",
    "curation_report",
    "load_config",
    "redact_pii",
]
