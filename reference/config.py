"""Model configuration, read from and written to Hugging Face `config.json`.

One dataclass covers both architectures: OPT (learned positions, LayerNorm, FFN `fc1`/`fc2`) and Llama (RoPE,
RMSNorm, gated FFN `gate_proj`/`up_proj`/`down_proj`). The Llama architecture covers the families built on it:
`model_type` llama, mistral (a sliding window) and qwen2 (biases on q, k and v). The FFN's activation is ReLU (the
sparse FFNs the paper's techniques rely on) or SiLU (most checkpoints people hold: dense, exact, naive reads only).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import CheckpointError

ARCHITECTURES = ("opt", "llama")
# model_type -> (architecture, transformers class name)
FAMILIES = {"opt": ("opt", "OPTForCausalLM"), "llama": ("llama", "LlamaForCausalLM"),
            "mistral": ("llama", "MistralForCausalLM"), "qwen2": ("llama", "Qwen2ForCausalLM")}
ACTIVATIONS = {"relu": "relu", "silu": "silu", "swish": "silu"}  # config.json spelling -> ours
ATTENTION_BIAS = ("none", "qkv", "all")  # which attention projections carry a bias


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
    arch: str  # "opt" or "llama": the layers' structure
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
    model_type: str = ""  # the family as config.json names it (FAMILIES); "" = the architecture's own
    attention_bias: str = "none"  # Llama family: "qkv" (Qwen2) or "all" (Llama's attention_bias); OPT has all
    sliding_window: int | None = None  # Mistral: keys further back than this are not attended to

    def __post_init__(self):
        if not self.model_type:
            object.__setattr__(self, "model_type", self.arch)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def gated(self) -> bool:
        """Llama-style FFNs multiply a gate by the up projection; OPT's do not."""
        return self.arch == "llama"

    @property
    def bias(self) -> bool:
        """The FFN and the norms carry biases (OPT)."""
        return self.arch == "opt"

    @property
    def qkv_bias(self) -> bool:
        return self.arch == "opt" or self.attention_bias in ("qkv", "all")

    @property
    def out_bias(self) -> bool:
        return self.arch == "opt" or self.attention_bias == "all"

    @property
    def sparse(self) -> bool:
        """A ReLU FFN: most of its activations are exactly zero, which is what every technique but naive reads
        from flash relies on."""
        return self.activation == "relu"

    def require_relu(self, where: str) -> None:
        """Sparse reads need a ReLU FFN: a SiLU FFN's neurons are all active, each a little."""
        if not self.sparse:
            raise CheckpointError(f"{where}: activation {self.activation!r} is dense (no neuron's output is exactly "
                                  "zero): what relies on exact zeros (sparse reads, activation counts, predictors, "
                                  "pruning) needs a ReLU FFN; naive reads and quantization apply")

    # ---- Hugging Face config.json ------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        def need(key: str):
            if key not in hf:
                raise CheckpointError(f"{source}: missing required key {key!r}")
            return hf[key]

        def activation(key: str) -> str:
            name = hf.get(key, "relu" if model_type == "opt" else "silu")
            if name not in ACTIVATIONS:
                raise CheckpointError(f"{source}: {key} {name!r} is not supported (supported: "
                                      f"{', '.join(ACTIVATIONS)})")
            return ACTIVATIONS[name]

        def token_id(key: str) -> int | None:
            value = hf.get(key)  # Llama 3 lists several EOS ids: a generation ends at the first here
            return (value[0] if value else None) if isinstance(value, list) else value

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
                activation=activation("activation_function"),
                norm_eps=1e-5,  # OPT's nn.LayerNorm default; OPTConfig has no eps key
                tie_embeddings=hf.get("tie_word_embeddings", True),
                bos_token_id=token_id("bos_token_id"),
                eos_token_id=token_id("eos_token_id"),
                pad_token_id=token_id("pad_token_id"),
            )
        elif model_type in FAMILIES:
            if hf.get("mlp_bias"):
                raise CheckpointError(f"{source}: FFN biases (mlp_bias) are not supported in the Llama family")
            rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 | 4 spelling
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise CheckpointError(f"{source}: RoPE type {rope_type!r} is not supported (only the default "
                                      "rotary embedding, without scaling)")
            heads = need("num_attention_heads")
            if hf.get("head_dim") not in (None, need("hidden_size") // heads):
                raise CheckpointError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads "
                                      "is not supported")
            if model_type == "qwen2":
                attention_bias = "qkv"  # Qwen2 always has q, k, v biases and none on o
                window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
            else:
                attention_bias = "all" if hf.get("attention_bias") else "none"
                window = hf.get("sliding_window")
            positions = need("max_position_embeddings")
            if window is not None and window < positions:
                positions = window  # exact up to the window (beyond it, attention would need the window's mask)
            cfg = cls(
                arch="llama",
                vocab_size=need("vocab_size"),
                d_model=need("hidden_size"),
                n_layers=need("num_hidden_layers"),
                n_heads=heads,
                n_kv_heads=hf.get("num_key_value_heads") or heads,
                d_ffn=need("intermediate_size"),
                max_positions=positions,
                activation=activation("hidden_act"),
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                tie_embeddings=hf.get("tie_word_embeddings", False),
                bos_token_id=token_id("bos_token_id"),
                eos_token_id=token_id("eos_token_id"),
                pad_token_id=token_id("pad_token_id"),
                model_type=model_type,
                attention_bias=attention_bias,
                sliding_window=window,
            )
        else:
            raise CheckpointError(
                f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(FAMILIES)})"
            )
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        if FAMILIES.get(self.model_type, ("",))[0] != self.arch:
            raise CheckpointError(f"{source}: model_type {self.model_type!r} is not a family of the {self.arch} "
                                  f"architecture (families: {', '.join(FAMILIES)})")
        if self.activation not in ACTIVATIONS.values() or self.attention_bias not in ATTENTION_BIAS:
            raise CheckpointError(f"{source}: activation {self.activation!r} / attention_bias "
                                  f"{self.attention_bias!r} is not one of {sorted(set(ACTIVATIONS.values()))} / "
                                  f"{list(ATTENTION_BIAS)}")
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
            "architectures": [FAMILIES[self.model_type][1]],
            "model_type": self.model_type,
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
        llama = common | {
            "intermediate_size": self.d_ffn,
            "num_key_value_heads": self.n_kv_heads,
            "hidden_act": self.activation,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,  # transformers 4 reads this, 5 rope_parameters
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "mlp_bias": False,
        }
        if self.model_type == "qwen2":  # q, k, v biases always; its window is switched by use_sliding_window
            return llama | {"use_sliding_window": self.sliding_window is not None, "sliding_window": self.sliding_window}
        window = {"sliding_window": self.sliding_window} if self.model_type == "mistral" else {}
        return llama | window | {"attention_bias": self.attention_bias == "all"}

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> "ModelConfig":
        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: no config.json in the checkpoint directory")
        return cls.from_hf(read_json_object(path, CheckpointError), source=str(path))

    def as_dict(self) -> dict:
        return asdict(self)
