"""The run configuration of ``augment run``: one pydantic model, loaded from a YAML or JSON file
plus command-line overrides, validated at load, and saved resolved (without any key) in --out.

Defaults that depend on other fields are filled in by :meth:`AugmentConfig.resolved`: the
endpoint (DeepSeek unless ``base_url`` is given), the model, the output folder
(``corpus/<dataset>``) and, for the embedded model (``llm: local``), a small concurrency,
answer length and number of source sentences unless set explicitly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from anchoralign import config_tree
from anchoralign.errors import UserError
from anchoralign.files import atomic_write_text
from augment.local_models import DEFAULT_LOCAL_MODEL
from augment.rules import DEFAULT_NAME_STYLE, NameStyle

DEEPSEEK_URL = "https://api.deepseek.com"
DEEPSEEK_MODEL = "deepseek-chat"
DEEPSEEK_KEY_ENV = "DEEPSEEK_API_KEY"
OTHER_KEY_ENV = "OPENAI_API_KEY"
# Local servers (llama.cpp, vLLM, Ollama) accept any key; the SDK insists on a non-empty one.
PLACEHOLDER_KEY = "no-key-needed"
# The model name of --llm rules, by name style: part of every request key, so its answers never
# mix with an LLM's or the other style's in one journal (a new rule set gets a new version).
RULES_MODELS = {"invented": "rules:v1", "shaped": "rules:shaped-v1"}
# The embedded server answers one request at a time: two in flight keep it busy while the
# runner journals and parses the other. Answers are sized to what was asked (see
# augment.plan.answer_budget). No bound on the sources: a run says its goal at start and shows a
# true rate and ETA, and is resumable, so a long run is a choice the user can see and stop.
# A 1.5B model keeps the markup and the placeholders more often when it samples less wildly:
# on CoNLL04's first sources, 0.6-0.7 passed validation on 36% of variants against 28% at 1.0
# (BENCHMARKS.md); the API default stays 1.0.
LOCAL_DEFAULTS: dict[str, Any] = {
    "concurrency": 2,
    "max_tokens": "auto",
    "timeout": 600.0,
    "temperature": 0.7,
}


class AugmentConfig(BaseModel):
    # Flag values are read as YAML: "--model 7" must stay the string "7".
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    dataset: str = Field(min_length=1, description="dataset name (e.g. conll04) or path to your records")
    data_dir: str | None = Field(
        default=None, description="folder holding <dataset>/ (default $ANCHORALIGN_DATA or ./data)"
    )
    split: str = Field(default="train", description="split to rewrite")
    fold: int | None = Field(default=None, ge=0, description="cross-validation fold (ADE)")
    cap: int = Field(default=10_000, ge=1, description="samples in the corpus")
    variants: int = Field(default=3, ge=1, le=20, description="variants asked for per request (K)")
    concurrency: int = Field(
        default=32, ge=1, le=1024, description="requests in flight (2 with --llm local unless given)"
    )
    timeout: float = Field(
        default=120.0, gt=0, description="seconds allowed for one attempt (600 with --llm local unless given)"
    )
    max_retries: int = Field(default=6, ge=0, le=50, description="retries of a failed request")
    backoff: float = Field(default=1.0, ge=0, description="base of the exponential backoff, seconds")
    backoff_max: float = Field(default=60.0, ge=0, description="longest wait between two retries, seconds")
    base_url: str | None = Field(default=None, description="OpenAI-compatible endpoint (default DeepSeek)")
    model: str | None = Field(default=None, description="model name (default deepseek-chat)")
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding the key (default DEEPSEEK_API_KEY / OPENAI_API_KEY)",
    )
    temperature: float = Field(
        default=1.0, ge=0, le=2, description="sampling temperature (0.7 with --llm local unless given)"
    )
    max_tokens: int | Literal["auto"] = Field(
        default=1024,
        description="longest answer in tokens, or 'auto' to size it to the variants asked for "
        "(auto with --llm local unless given)",
    )
    seed: int = Field(default=0, description="order of the sources and of the selection")
    out: str | None = Field(default=None, description="output folder (default corpus/<dataset>)")
    llm: Literal["api", "local", "rules"] = Field(
        default="api",
        description="'api': the endpoint of --base-url; 'local': the embedded llama.cpp model, offline; "
        "'rules': no LLM, invented names and an opener phrase (augment/rules.py), offline in seconds",
    )
    rules_names: NameStyle | None = Field(
        default=None,
        description="mentions of --llm rules: 'invented' (the default; one or two made-up words) or "
        "'shaped' (the original's shape kept: words, case, digits, punctuation; augment/rules.py)",
    )
    gguf: str | None = Field(
        default=None, description="any GGUF model file for --llm local, instead of --local-model"
    )
    local_model: str | None = Field(
        default=None,
        description="model of --llm local: 'qwen' (the default; Qwen2.5-Coder-1.5B-Instruct) or 'smollm2' "
        "(a 135M model: fast, but most rewrites fail; a smoke test)",
    )
    local_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="llama.cpp threads for --llm local (default: half the cores, so 1 on 2 cores: "
        "more threads than free cores stall llama.cpp)",
    )
    price_in: float | None = Field(
        default=None, ge=0, description="USD per million prompt tokens (for the cost)"
    )
    price_out: float | None = Field(default=None, ge=0, description="USD per million completion tokens")
    max_sources: int | None = Field(default=None, ge=1, description="try at most this many source sentences")
    mention_prompt: str | None = Field(
        default=None, description="template file of the mention rewrite (default prompts/, newest version)"
    )
    context_prompt: str | None = Field(
        default=None, description="template file of the context rewrite (default prompts/, newest version)"
    )
    verify: bool = Field(
        default=False,
        description="ask the LLM, one question per relation of each accepted variant, whether it still "
        "holds; reject the variant (failed_verification) if not (augment/verify.py)",
    )
    verify_prompt: str | None = Field(default=None, description="template file of the verification question")

    @model_validator(mode="after")
    def _compatible(self) -> AugmentConfig:
        if self.llm != "api" and self.base_url is not None:
            raise ValueError(
                f"base_url cannot be combined with llm '{self.llm}' (its embedded server picks its own)"
            )
        if self.llm == "rules" and self.verify:
            raise ValueError("verify needs an LLM to ask: it cannot be combined with llm 'rules'")
        if self.rules_names is not None and self.llm != "rules":
            raise ValueError("rules_names is only used with llm 'rules'")
        if self.gguf is not None and self.llm != "local":
            raise ValueError("gguf is only used with llm 'local'")
        if self.local_model is not None:
            from augment.local_models import LOCAL_MODELS

            if self.llm != "local":
                raise ValueError("local_model is only used with llm 'local'")
            if self.gguf is not None:
                raise ValueError("give local_model or gguf, not both")
            if self.local_model not in LOCAL_MODELS:
                raise ValueError(
                    f"unknown local model {self.local_model!r} (known: {', '.join(LOCAL_MODELS)})"
                )
        if isinstance(self.max_tokens, int) and self.max_tokens < 16:
            raise ValueError("max_tokens must be at least 16 (or 'auto')")
        return self

    @property
    def dataset_label(self) -> str:
        """A folder-friendly name: the dataset name, or the file stem of a dataset path."""
        p = Path(self.dataset)
        return p.stem if (p.suffix or os.sep in self.dataset) else self.dataset

    def resolved(self) -> AugmentConfig:
        """A copy with every derived default filled in (what is saved next to the corpus)."""
        values = self.model_dump()
        if self.llm == "local":
            for name, value in LOCAL_DEFAULTS.items():
                if name not in self.model_fields_set:
                    values[name] = value
            if self.gguf is None and self.local_model is None:
                values["local_model"] = DEFAULT_LOCAL_MODEL
            # The model name is part of every request key, so answers of different GGUFs never mix.
            if self.model is None:
                values["model"] = f"local:{self.local_gguf_name(values['local_model'])}"
        elif self.llm == "rules":
            values["rules_names"] = self.rules_names or DEFAULT_NAME_STYLE
            values["model"] = self.model or RULES_MODELS[values["rules_names"]]
        else:
            values["base_url"] = self.base_url or DEEPSEEK_URL
            values["model"] = self.model or DEEPSEEK_MODEL
        values["out"] = self.out or str(Path("corpus") / self.dataset_label)
        return AugmentConfig.model_validate(values)

    def local_gguf_name(self, local_model: str | None) -> str:
        """The file name of the GGUF a local run uses, known without assembling the model."""
        if self.gguf is not None:
            return Path(self.gguf).name
        from augment.local_models import LOCAL_MODELS, ChunkedModel

        spec = LOCAL_MODELS[local_model or DEFAULT_LOCAL_MODEL]
        # A packaged file's name is whatever its package ships (older journals are keyed on it).
        return spec.file_name if isinstance(spec, ChunkedModel) else spec.locate().name

    @property
    def out_dir(self) -> Path:
        return Path(self.out or str(Path("corpus") / self.dataset_label))


def api_key_variable(cfg: AugmentConfig) -> str:
    """The environment variable the key is read from."""
    return cfg.api_key_env or (DEEPSEEK_KEY_ENV if cfg.base_url in (None, DEEPSEEK_URL) else OTHER_KEY_ENV)


def resolve_api_key(cfg: AugmentConfig, environ: dict[str, str] | None = None) -> str:
    """The key to send. Only the variable's name is ever stored; the value goes to the SDK only.

    Endpoints given with ``base_url`` (usually local servers) work without a key unless the user
    named a variable with ``api_key_env``; the default DeepSeek endpoint always needs one.
    """
    env = os.environ if environ is None else environ
    if cfg.llm != "api":
        return PLACEHOLDER_KEY
    name = api_key_variable(cfg)
    key = env.get(name, "").strip()
    if key:
        return key
    if cfg.base_url not in (None, DEEPSEEK_URL) and cfg.api_key_env is None:
        return PLACEHOLDER_KEY
    where = cfg.base_url or DEEPSEEK_URL
    raise UserError(
        f"no API key: set the environment variable {name} for {where} "
        "(or use --base-url for another endpoint, --api-key-env to read another variable, or --llm local)"
    )


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> AugmentConfig:
    """File values, then ``overrides`` (None values are ignored: the flag was not given)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return config_tree.load(AugmentConfig, path, given)


def save_config(cfg: AugmentConfig, path: Path) -> None:
    """Write the resolved config (it holds the key's variable name, never the key)."""
    atomic_write_text(path, json.dumps(cfg.model_dump(), indent=2) + "\n")
