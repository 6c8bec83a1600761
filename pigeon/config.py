"""Typed, validated configuration: one frozen class per ``params.yaml`` section.

An unknown or mistyped key, a wrong type or an out-of-range value fails with a one-line
``ConfigError`` that names the key. Profiles (``profiles/<name>.yaml``) are deep-merged over
``params.yaml``; the profile is chosen by ``--profile`` or the ``PIGEON_PROFILE`` variable.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pigeon.errors import ConfigError

STYLES = (
    "twemoji",
    "noto",
    "noto-v1",
    "openmoji",
    "openmoji-black",
    "fluent-emoji-flat",
    "fluent-emoji-high-contrast",
    "fluent-3d",
    "emojione",
    "emojione-monotone",
)


class Section(BaseModel):
    """Base of every section: frozen, strict about unknown keys, finite numbers only."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


Fraction = Field(ge=0.0, le=1.0)


class DataConfig(Section):
    styles: tuple[str, ...] = Field(STYLES, description="Vendor styles to build, ids as in docs/design.md §7.")
    sizes: tuple[int, ...] = Field((32, 64), description="Square image sizes rendered, in pixels.")
    drop_groups: tuple[str, ...] = Field(("symbols",), description="Emoji groups left out.")
    max_emoji: int | None = Field(None, ge=1, description="Keep only the first N shared emoji (tests).")
    normalize_bbox: bool = Field(False, description="Scale every glyph to fill the canvas (ablation).")
    cache_dir: str = Field(".cache/npm", description="Where fetched package tarballs are kept.")

    @field_validator("styles")
    @classmethod
    def _known_styles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for style in value:
            if style not in STYLES:
                raise ValueError(f"unknown style {style!r} (known: {', '.join(STYLES)})")
        if len(set(value)) != len(value) or len(value) < 2:
            raise ValueError("needs at least 2 distinct styles")
        return value

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(s not in (16, 32, 64, 128) for s in value):
            raise ValueError("sizes must be among 16, 32, 64, 128")
        return value


class SimulateConfig(Section):
    num_users: int = Field(1000, ge=10, description="Simulated users.")
    min_interactions: int = Field(12, ge=6, description="Shortest interaction sequence.")
    max_interactions: int = Field(30, ge=6, description="Longest interaction sequence.")
    noise_rate: float = Field(0.2, ge=0.0, lt=1.0, description="Share of history items in other styles.")
    min_groups: int = Field(1, ge=1, description="Fewest preferred emoji groups per user.")
    max_groups: int = Field(3, ge=1, description="Most preferred emoji groups per user.")
    group_focus: float = Field(0.8, ge=0.0, le=1.0, description="Share of items from preferred groups.")
    window: int = Field(6, ge=2, description="Window length: history + 1 target.")
    split: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train/val/test user shares.")
    noise_tolerance: float = Field(0.05, gt=0.0, le=0.5, description="Validation tolerance on noise rate.")

    @model_validator(mode="after")
    def _check(self) -> SimulateConfig:
        if self.max_interactions < self.min_interactions:
            raise ValueError("max_interactions must be >= min_interactions")
        if self.max_groups < self.min_groups:
            raise ValueError("max_groups must be >= min_groups")
        if self.min_interactions < self.window:
            raise ValueError("min_interactions must be >= window")
        if any(s <= 0 for s in self.split) or not math.isclose(sum(self.split), 1.0, abs_tol=1e-6):
            raise ValueError("split must be three positive shares summing to 1")
        return self


class IngestConfig(Section):
    """The interaction log (``data/log``) grows one simulated day at a time (docs/design.md §3): day 0 is
    the ``simulate.num_users`` cohort; each later day brings new users and sessions of returning ones,
    drawn with the same preference and noise model."""

    day: int = Field(0, ge=0, description="The last day the log holds; missing days up to it are appended. "
                     "A log that already holds it is left as it is (a log never shrinks).")
    new_users: int = Field(100, ge=0, description="Users whose first day it is, per day after day 0.")
    returning_share: float = Field(0.3, ge=0.0, le=1.0, description="Share of the earlier users who come back "
                                   "on a day.")
    min_session: int = Field(3, ge=1, description="Fewest interactions of a returning user's session.")
    max_session: int = Field(8, ge=1, description="Most interactions of a returning user's session.")
    drift_share: float = Field(0.0, ge=0.0, le=1.0, description="Share of a day's users who take up "
                               "drift_style from that day on (returning users switch, new users start with it).")
    drift_style: str | None = Field(None, description="The style drifting users take up; None: a random other "
                                    "style per user (churn without a change in the style mix).")
    style_mix_tolerance: float = Field(0.05, gt=0.0, le=1.0, description="Validation: each style's share of a "
                                       "new day's interactions must lie within the range of the earlier days' "
                                       "shares widened by this much.")

    @model_validator(mode="after")
    def _check(self) -> IngestConfig:
        if self.max_session < self.min_session:
            raise ValueError("max_session must be >= min_session")
        if self.drift_style is not None and self.drift_style not in STYLES:
            raise ValueError(f"unknown drift_style {self.drift_style!r} (known: {', '.join(STYLES)})")
        return self


class VQConfig(Section):
    block_channels: tuple[int, ...] = Field((32, 64, 128), description="VQModel block widths.")
    latent_channels: int = Field(32, ge=1)
    code_dim: int = Field(16, ge=1, description="Codebook vector size (vq_embed_dim).")
    codebook_size: int = Field(512, ge=2, description="K, the visual vocabulary.")
    layers_per_block: int = Field(1, ge=1)


class LMConfig(Section):
    hidden_size: int = Field(256, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(688, ge=8)
    max_caption_tokens: int = Field(12, ge=2, description="Caption tokens in the prompt (left-padded).")

    @model_validator(mode="after")
    def _heads(self) -> LMConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        return self


class DiffusionConfig(Section):
    block_channels: tuple[int, ...] = Field((32, 64, 64))
    cross_attention_dim: int = Field(64, ge=8)
    train_timesteps: int = Field(1000, ge=10)
    inference_steps: int = Field(25, ge=1)


class BackboneConfig(Section):
    kind: Literal["tiny", "janus"] = Field("tiny", description="Which LMM backs the model.")
    image_size: int = Field(32, description="Image size the model reads and writes.")
    detokenizer: Literal["vq", "diffusion"] = Field("vq", description="Codes → pixels path.")
    vq: VQConfig = VQConfig()
    lm: LMConfig = LMConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    janus_path: str | None = Field(None, description="Local folder of a Janus checkpoint (janus kind).")
    trust_remote_code: bool = Field(False, description="Only for a local backbone path you trust.")

    @model_validator(mode="after")
    def _janus(self) -> BackboneConfig:
        if self.kind == "janus" and not self.janus_path:
            raise ValueError("backbone.janus_path is required when backbone.kind is 'janus'")
        return self


class FoundationConfig(Section):
    vq_steps: int = Field(1000, ge=0)
    vq_batch_size: int = Field(64, ge=1)
    vq_lr: float = Field(1e-3, gt=0)
    dead_code_every: int = Field(50, ge=1, description="Re-seed unused codes every N steps.")
    lm_steps: int = Field(900, ge=0)
    lm_batch_size: int = Field(32, ge=1)
    lm_lr: float = Field(1e-3, gt=0)
    context_noise: float = Field(0.2, ge=0.0, lt=1.0, description="Share of an LM sequence's style-context "
                                 "images swapped for random images of any style (the noise users' histories have).")
    vq_edge_weight: float = Field(1.0, ge=0.0, description="Weight of the L1 loss on image gradients (outlines and "
                                  "shading edges) beside the VQ's pixel MSE.")
    diffusion_steps: int = Field(0, ge=0, description="Diffusion detokenizer steps (gpu profile).")
    diffusion_batch_size: int = Field(64, ge=1)
    diffusion_lr: float = Field(2e-4, gt=0)
    holdout_fraction: float = Field(0.05, gt=0, lt=0.5, description="Held-out images for recon metrics.")
    checkpoint_every: int = Field(100, ge=1)


class MaskConfig(Section):
    alpha_hist: float = Field(0.2, ge=0.0, lt=1.0, description="Share of history tokens masked out.")
    mode: Literal["trained", "released", "none"] = Field(
        "trained",
        description="trained: straight-through mask learns; released: no gradient (authors' code); "
        "none: keep every history token.",
    )
    num_heads: int = Field(4, ge=1)


class ModelConfig(Section):
    history_len: int = Field(5, ge=1, description="History images per window.")
    mask: MaskConfig = MaskConfig()
    adapter_hidden: int = Field(512, ge=1, description="Adapter MLP hidden width.")
    use_adapter: bool = Field(True, description="Adapter on the reference features (ablation: off).")
    reference: Literal["grid", "pooled"] = Field(
        "grid", description="grid: the kept reference tokens enter one by one (their layout passes); "
        "pooled: the paper's single <emb> vector (ablation).")
    reference_views: int = Field(4, ge=0, description="Random style-stripped training views per reference image "
                                 "(view 0, plain grayscale, is the inference view).")
    history_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Share of training windows whose whole "
                                   "history is masked, so the model also learns the history-free distribution "
                                   "that sampling.history_guidance pushes away from; 0 = off (README, experiments).")


class LoraConfig(Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = Field(("q_proj", "v_proj"))


class SamplingConfig(Section):
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(0, ge=0, description="0 = no top-k.")
    history_prior: float = Field(0.0, ge=0.0, description="Weight of the history's code prior: the log-frequency "
                                 "of each code among the kept history tokens (smoothed) added to the logits. "
                                 "Trades content for style; 0 = off (README, experiments).")
    history_guidance: float = Field(1.0, ge=0.0, description="Classifier-free guidance on the history: logits = "
                                    "history-free + scale × (with history − history-free); 1 = off, 0 = the "
                                    "history-free model. Pair with model.history_dropout > 0 (README, experiments).")


class Stage1Config(Section):
    lora: LoraConfig = LoraConfig()
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(400, ge=1, description="Stop after N steps (null: whole epochs).")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    val_windows: int = Field(256, ge=1, description="Fixed, seeded validation subset.")
    eval_every: int = Field(50, ge=1)
    patience: int = Field(3, ge=1, description="Early stopping: evaluations without improvement.")
    checkpoint_every: int = Field(50, ge=1)


class CandidatesConfig(Section):
    alpha_sweep: tuple[float, ...] = Field(tuple(round(0.1 * i, 1) for i in range(11)))
    train_windows: int = Field(300, ge=1, description="Training windows that get candidates.")
    val_windows: int = Field(48, ge=1, description="Validation windows (held-out DPO pairs).")
    shard_size: int = Field(32, ge=1, description="Windows per shard.")
    batch_size: int = Field(64, ge=1, description="Sequences generated at once.")
    reference: Literal["target", "cross_style"] = Field(
        "cross_style", description="The reference candidates are generated from: the window's target itself "
        "(as in stage 1), or a seeded item of another style and another emoji (as at inference, where the "
        "reference is never in the user's style; no target is involved, so no pair of one emoji in two styles).")
    sampling: SamplingConfig = SamplingConfig()

    @field_validator("alpha_sweep")
    @classmethod
    def _sweep(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) < 2 or any(not 0.0 <= a <= 1.0 for a in value):
            raise ValueError("alpha_sweep needs at least 2 values in [0, 1]")
        return value


class RankConfig(Section):
    w_history: float = Field(0.5, ge=0.0, description="Weight of mean similarity to the 5 history images.")
    w_reference: float = Field(0.5, ge=0.0, description="Weight of similarity to the reference.")
    min_margin: float = Field(0.01, ge=0.0, description="Drop windows whose chosen-rejected margin is lower.")
    features: Literal["pooled", "split"] = Field(
        "split", description="pooled: both terms compare all reward features; split: the history term compares "
        "the style statistics (channel mean and std) and the reference term the layout (2x2 grid).")

    @model_validator(mode="after")
    def _weights(self) -> RankConfig:
        if self.w_history + self.w_reference <= 0:
            raise ValueError("w_history + w_reference must be positive")
        return self


class DPOConfig(Section):
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid")
    beta: float = Field(0.1, gt=0.0)
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    train_adapter: bool = Field(True, description="Also train the adapter MLP (LoRA always trains).")
    checkpoint_every: int = Field(20, ge=1)


class EvaluatorsConfig(Section):
    steps: int = Field(4000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    width: int = Field(32, ge=4, description="Base channel width of the evaluator CNN.")
    feature_dim: int = Field(128, ge=8)
    content_views: bool = Field(True, description="Train the content head also on style-destroyed views "
                                "(grayscale, line art, channel swaps) so it names emoji in an unseen style.")
    pooled_style: bool = Field(True, description="The style head reads the last feature map's per-channel mean "
                               "and std (layout-free) instead of the flattened features.")
    reconstruction_share: float = Field(0.5, ge=0.0, le=1.0, description="Share of each batch drawn from the "
                                        "foundation tokenizer's reconstructions of the real images (0 = real only).")
    degrade: bool = Field(True, description="Also blur or palette-quantise a share of the training images, as "
                          "generated images are.")
    style_width: int = Field(32, ge=0, description="Base width of a separate style network (its own trunk, a head "
                             "on the channel mean and std); 0 = the style head shares the content trunk.")
    style_reconstruction_share: float = Field(0.15, ge=0.0, le=1.0, description="With a style network: its share "
                                              "of reconstructions per batch (never degraded: blur erases line weight).")
    clip_path: str | None = Field(None, description="Local CLIP folder for the paper's CLIP metrics.")
    dino_path: str | None = Field(None, description="Local DINO folder for the paper's DINO metrics.")
    holdout_emoji_fraction: float = Field(0.15, gt=0.0, lt=1.0,
                                          description="Emoji whose style labels are held out (style accuracy).")
    holdout_style: str | None = Field(None, description="Style whose content labels are held out; None = seeded pick.")
    release_holdout_at: float = Field(0.75, gt=0.0, le=1.0,
                                      description="Share of steps after which held-out accuracy is measured and "
                                                  "the held-out labels join training (1 = never).")


class EvaluateConfig(Section):
    test_windows: int = Field(160, ge=1, description="Test windows scored (seeded subset).")
    alpha_ref: float = Field(0.0, ge=0.0, le=1.0, description="Fixed α_r of the 'Pigeon' row (0: the whole "
                             "reference; any masked share loses the layout: README, experiments).")
    select_sweep: tuple[float, ...] = Field((0.0, 0.2, 0.4, 0.6), description="α_r swept for selection.")
    batch_size: int = Field(64, ge=1)
    shard_size: int = Field(64, ge=1, description="Test windows per generation shard, rounded up to whole "
                            "batches of every row so that the results never depend on it.")
    bootstrap: int = Field(1000, ge=10, description="Bootstrap resamples for 95% intervals.")
    grid_users: int = Field(6, ge=1)
    sampling: SamplingConfig = SamplingConfig(temperature=0.5, history_prior=1.0)
    style_strength: float = Field(0.5, ge=0.0, le=1.0, description="Style transfer in the detokenizer: the "
                                  "decoded image's feature statistics move this far toward those of the kept "
                                  "history tokens (0 = plain decoding; README, experiments).")


class RegisterConfig(Section):
    """The promotion gate (pigeon/registry.py ``gate``): every metric it reads must be higher-is-better."""

    model_name: str = Field("pigeon")
    personalization_metric: str = Field("style_accuracy")
    semantic_metric: str = Field("content_accuracy")
    protocol: Literal["ground_truth", "paper"] = Field(
        "ground_truth", description="Protocol whose headline numbers gate promotion.")
    min_gain: float = Field(0.0, ge=0.0, description="Personalization must beat the zero-shot row and the "
                            "champion by more than this.")
    semantic_tolerance: float = Field(0.02, ge=0.0, description="Allowed drop in the semantic metric (vs the best "
                                      "generative baseline of the same run, and vs the champion).")
    min_personalization: float = Field(0.15, ge=0.0, description="Absolute floor of the personalization metric "
                                       "(style accuracy: chance is 1 / number of styles, 0.10 for the 10 "
                                       "styles); the gate also requires it above the run's chance level.")
    min_semantic: float = Field(0.01, ge=0.0, description="Absolute floor of the semantic metric (content accuracy: "
                                "chance is 1 / number of emoji, 0.0011); also required above the run's chance.")

    @field_validator("personalization_metric", "semantic_metric")
    @classmethod
    def _higher_is_better(cls, value: str) -> str:
        if value == "frechet_distance":  # the one lower-is-better headline metric of reports/metrics.json
            raise ValueError(f"{value!r} is lower-is-better; the gate compares higher-is-better metrics")
        return value


class TrackingConfig(Section):
    enabled: bool = Field(True)
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI.")
    experiment: str = Field("pigeon")
    artifact_location: str = Field("mlartifacts", description="Artifact root for a new experiment.")


class OrchestrationConfig(Section):
    task_runner: Literal["thread", "dask"] = Field("thread")
    dask_workers: int = Field(2, ge=1, description="Worker processes of the local Dask cluster.")
    dask_address: str | None = Field(None, description="Scheduler address of a running Dask cluster "
                                     "(e.g. tcp://scheduler:8786, workers on GPU nodes); None starts a "
                                     "local cluster of dask_workers processes.")
    retries: int = Field(1, ge=0)
    gpu_concurrency: int = Field(1, ge=1, description="Slots of the 'gpu' global concurrency limit.")


warnings.filterwarnings("ignore", message='Field name "register"')


class Params(Section):
    """The whole ``params.yaml``."""

    # "register" is a stage name; pydantic warns it shadows BaseModel.register (harmless).

    profile: str = Field("default", description="profiles/<name>.yaml merged over this file.")
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = Field("auto")
    threads: int = Field(0, ge=0, description="Torch CPU threads; 0 = OMP_NUM_THREADS or every available core.")
    data: DataConfig = DataConfig()
    simulate: SimulateConfig = SimulateConfig()
    ingest: IngestConfig = IngestConfig()
    backbone: BackboneConfig = BackboneConfig()
    foundation: FoundationConfig = FoundationConfig()
    model: ModelConfig = ModelConfig()
    stage1: Stage1Config = Stage1Config()
    candidates: CandidatesConfig = CandidatesConfig()
    rank: RankConfig = RankConfig()
    dpo: DPOConfig = DPOConfig()
    evaluators: EvaluatorsConfig = EvaluatorsConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = RegisterConfig()
    tracking: TrackingConfig = TrackingConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @model_validator(mode="after")
    def _cross(self) -> Params:
        if self.backbone.image_size not in self.data.sizes:
            raise ValueError(f"backbone.image_size {self.backbone.image_size} is not in data.sizes")
        if self.simulate.window != self.model.history_len + 1:
            raise ValueError("simulate.window must equal model.history_len + 1")
        if self.ingest.drift_style is not None and self.ingest.drift_style not in self.data.styles:
            raise ValueError(f"ingest.drift_style {self.ingest.drift_style!r} is not in data.styles")
        if (self.backbone.kind == "tiny" and self.backbone.detokenizer == "diffusion"
                and self.evaluate.style_strength > 0):
            raise ValueError("evaluate.style_strength must be 0 with backbone.detokenizer: diffusion (the style "
                             "transfer renormalises the VQ decoder's feature maps; the diffusion decoder has none)")
        return self


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_error(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (typo?)"
    value = err.get("input")
    shown = "" if isinstance(value, dict) or err["type"] == "extra_forbidden" else f" (got {value!r})"
    return f"{source}: {key}: {msg}{shown}"


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def parse_override(text: str) -> dict:
    """``stage1.lr=3e-4`` → ``{"stage1": {"lr": 3e-4}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: bad value") from exc
    out: dict = value
    for part in reversed(key.strip().split(".")):
        if not part:
            raise ConfigError(f"override {text!r}: empty key")
        out = {part: out}
    return out


def params_from_dict(data: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None


def load_raw_params(
    path: str | Path = "params.yaml", profile: str | None = None, overrides: list[str] | tuple = ()
) -> dict:
    path = Path(path)
    data = _read_yaml(path)
    # Precedence: explicit argument, then PIGEON_PROFILE, then the file's own `profile` key.
    profile = profile or os.environ.get("PIGEON_PROFILE") or data.get("profile") or "default"
    data["profile"] = profile
    if profile != "default":
        profile_path = path.resolve().parent / "profiles" / f"{profile}.yaml"
        if not profile_path.is_file():
            raise ConfigError(f"profile {profile!r}: {profile_path} not found")
        data = _deep_merge(data, _read_yaml(profile_path))
    for text in overrides:
        data = _deep_merge(data, parse_override(text))
    return data


def load_params(
    path: str | Path = "params.yaml", profile: str | None = None, overrides: list[str] | tuple = ()
) -> Params:
    """Read params.yaml, merge the profile and ``KEY=VALUE`` overrides, validate."""
    data = load_raw_params(path, profile, overrides)
    source = str(path) + (f" (+profile {data['profile']})" if data["profile"] != "default" else "")
    return params_from_dict(data, source)


def dump_params(params: Params) -> str:
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)


def section_dict(params: Params, *names: str) -> dict[str, Any]:
    """The named sections as plain data (cache keys, MLflow params)."""
    return {name: getattr(params, name).model_dump(mode="json") if isinstance(getattr(params, name), BaseModel)
            else getattr(params, name) for name in names}
