"""MLA decode in the absorbed form (DeepSeek-V2): one query token per sequence attending over its latent
cache, read once; split-K over long contexts (flash-decoding), ragged lengths (ops.mla_decode); TPLA's
per-shard softmax with the all-reduce over the "tensor" mesh axis (ops.latent_decode)."""

from zoo.pallas_kernels.mla_decode.ops import latent_decode, mla_decode

__all__ = ["latent_decode", "mla_decode"]
