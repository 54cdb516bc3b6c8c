"""Typed configuration: the shared sections (`schema`), one config per command and job
(`commands`), and the one loader every entry point uses (`loader`: defaults, YAML, flags,
`--set key.sub=value`, each value checked before any work starts)."""

from dresd.config.commands import (  # noqa: F401  (the package's public names)
    PACKAGED_PROMPTS,
    BuildConfig,
    CacheCommandConfig,
    CalibrateConfig,
    DatastoreCommandConfig,
    DecodeConfig,
    DemoConfig,
    GenerateConfig,
    ServeConfig,
    UpdateConfig,
)
from dresd.config.loader import ConfigError, from_dict, load_config, load_yaml, to_dict  # noqa: F401
from dresd.config.schema import (  # noqa: F401
    CacheConfig,
    CorpusConfig,
    IndexConfig,
    ModelConfig,
    SamplingParams,
    SpeculativeConfig,
)
