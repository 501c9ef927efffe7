"""Model configuration, read from and written to Hugging Face `config.json`.

One dataclass covers both architectures the suite is about: OPT (learned positions, LayerNorm, ReLU FFN
`fc1`/`fc2`) and Llama with a gated ReLU FFN (RoPE, RMSNorm, `gate_proj`/`up_proj`/`down_proj`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import CheckpointError

ARCHITECTURES = {"opt": "OPTForCausalLM", "llama": "LlamaForCausalLM"}


def read_json_object(path: Path, error: type[Exception]) -> dict:
    """A JSON object from `path`, or `error` naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "opt" or "llama"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ffn: int
    max_positions: int
    activation: str = "relu"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def gated(self) -> bool:
        """Llama-style FFNs multiply a gate by the up projection; OPT's do not."""
        return self.arch == "llama"

    @property
    def bias(self) -> bool:
        return self.arch == "opt"

    def require_relu(self, where: str) -> None:
        """The suite is about ReLU FFNs: theirs are the sparse activations flash inference relies on."""
        if self.activation != "relu":
            raise CheckpointError(f"{where}: activation {self.activation!r} is not supported: the suite is about "
                                  "ReLU FFNs, whose activations are sparse")

    # ---- Hugging Face config.json ------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        def need(key: str):
            if key not in hf:
                raise CheckpointError(f"{source}: missing required key {key!r}")
            return hf[key]

        model_type = hf.get("model_type")
        if model_type == "opt":
            if not hf.get("do_layer_norm_before", True):
                raise CheckpointError(f"{source}: post-LayerNorm OPT (350m-style) is not supported")
            if hf.get("word_embed_proj_dim", hf.get("hidden_size")) != hf.get("hidden_size"):
                raise CheckpointError(f"{source}: word_embed_proj_dim != hidden_size is not supported")
            if not hf.get("enable_bias", True) or not hf.get("layer_norm_elementwise_affine", True):
                raise CheckpointError(f"{source}: OPT without biases or LayerNorm affine is not supported")
            heads = need("num_attention_heads")
            cfg = cls(
                arch="opt",
                vocab_size=need("vocab_size"),
                d_model=need("hidden_size"),
                n_layers=need("num_hidden_layers"),
                n_heads=heads,
                n_kv_heads=heads,
                d_ffn=need("ffn_dim"),
                max_positions=need("max_position_embeddings"),
                activation=hf.get("activation_function", "relu"),
                norm_eps=1e-5,  # OPT's nn.LayerNorm default; OPTConfig has no eps key
                tie_embeddings=hf.get("tie_word_embeddings", True),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
            )
        elif model_type == "llama":
            if hf.get("attention_bias") or hf.get("mlp_bias"):
                raise CheckpointError(f"{source}: Llama with biases is not supported")
            if hf.get("rope_scaling"):
                raise CheckpointError(f"{source}: rope_scaling is not supported")
            heads = need("num_attention_heads")
            cfg = cls(
                arch="llama",
                vocab_size=need("vocab_size"),
                d_model=need("hidden_size"),
                n_layers=need("num_hidden_layers"),
                n_heads=heads,
                n_kv_heads=hf.get("num_key_value_heads") or heads,
                d_ffn=need("intermediate_size"),
                max_positions=need("max_position_embeddings"),
                activation=hf.get("hidden_act", "silu"),
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=hf.get("rope_theta", 10000.0),
                tie_embeddings=hf.get("tie_word_embeddings", False),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
            )
        else:
            raise CheckpointError(
                f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(ARCHITECTURES)})"
            )
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        if self.d_model % self.n_heads:
            raise CheckpointError(f"{source}: hidden size {self.d_model} is not divisible by {self.n_heads} heads")
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(f"{source}: {self.n_heads} heads are not a multiple of {self.n_kv_heads} KV heads")
        if self.arch == "llama" and self.head_dim % 2:
            raise CheckpointError(f"{source}: RoPE needs an even head size, got {self.head_dim}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ffn", "max_positions"):
            if getattr(self, name) <= 0:
                raise CheckpointError(f"{source}: {name} must be positive, got {getattr(self, name)}")

    def to_hf(self) -> dict:
        common = {
            "architectures": [ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "max_position_embeddings": self.max_positions,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.arch == "opt":
            return common | {
                "ffn_dim": self.d_ffn,
                "word_embed_proj_dim": self.d_model,
                "do_layer_norm_before": True,
                "activation_function": self.activation,
                "enable_bias": True,
                "layer_norm_elementwise_affine": True,
                "dropout": 0.0,
                "attention_dropout": 0.0,
            }
        return common | {
            "intermediate_size": self.d_ffn,
            "num_key_value_heads": self.n_kv_heads,
            "hidden_act": self.activation,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "attention_bias": False,
            "mlp_bias": False,
        }

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> "ModelConfig":
        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: no config.json in the checkpoint directory")
        return cls.from_hf(read_json_object(path, CheckpointError), source=str(path))

    def as_dict(self) -> dict:
        return asdict(self)
