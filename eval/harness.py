"""A zoo checkpoint as an lm-evaluation-harness model, for users who have the harness installed:

    import lm_eval
    from zoo.eval.harness import ZooLM

    lm_eval.simple_evaluate(model=ZooLM("runs/my-run", mesh="data=8"), tasks=["arc_easy", "hellaswag"])

(or, once this module is imported, `model="zoo", model_args="checkpoint=runs/my-run"`). The three request
kinds map onto zoo's own evaluation code:
- loglikelihood(context, continuation) -> (log p, is_greedy): zoo.eval.loglikelihood, with the harness's
  context/continuation split and left truncation to the model's context;
- loglikelihood_rolling(text) -> log p of the whole text: zoo.eval.perplexity with non-overlapping windows of
  the model's max_seq_len (the first token is scored from BOS when the tokenizer has one, otherwise not);
- generate_until(context, {until, max_gen_toks, temperature, do_sample}) -> text: zoo.generate, cut before the
  first stop string.
Without lm-evaluation-harness installed the class is the same plain object, so it can be driven (and tested)
by anything that passes requests with an `.args` tuple.
"""

from __future__ import annotations

from zoo.eval.loglikelihood import encode_pair, score_requests

try:
    from lm_eval.api.model import LM as _HarnessLM
    from lm_eval.api.registry import register_model as _register
except ImportError:  # the harness is optional
    _HarnessLM, _register = object, None


class ZooLM(_HarnessLM):
    def __init__(self, checkpoint: str, mesh: str | None = None, batch_size: int | str = 8, max_gen_toks: int = 256,
                 progress: bool = True, **_ignored):
        if _HarnessLM is not object:
            super().__init__()
        from zoo.train.checkpoint import load_model
        from zoo.train.mesh import make_mesh, parse_mesh

        self.mesh = make_mesh(parse_mesh(mesh))
        self.model = load_model(checkpoint, self.mesh)
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.progress = progress

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        m = self.model
        pairs = [encode_pair(m.tokenizer, *r.args[:2]) for r in requests]
        scores = score_requests(m.config, m.params, pairs, mesh=self.mesh, batch_size=self.batch_size, truncate=True,
                                progress=self.progress and not disable_tqdm, desc="loglikelihood")
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from zoo.eval.perplexity import perplexity

        m = self.model
        out = []
        for r in requests:
            text = r.args[0]
            if len(m.tokenizer.encode(text, bos=getattr(m.tokenizer, "bos_id", None) is not None)) < 2:
                out.append(0.0)  # nothing to predict
                continue
            result = perplexity(m.config, m.params, m.tokenizer, text, mesh=self.mesh, context=self.max_length,
                                stride=self.max_length, batch_size=self.batch_size, progress=False)
            out.append(-result.nll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from zoo.generate import Generator, Sampling

        m = self.model
        generator = Generator(m.config, m.params, eos_id=m.tokenizer.eos_id, pad_id=getattr(m.tokenizer, "pad_id", 0))
        bos = getattr(m.tokenizer, "bos_id", None) is not None
        out = []
        for r in requests:
            context, options = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = min(int(options.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
            temperature = float(options.get("temperature", 0.0)) if options.get("do_sample", False) else 0.0
            prompt = m.tokenizer.encode(context, bos=bos)[-(self.max_length - budget):]  # the harness cuts on the left
            tokens = generator([prompt], budget, Sampling(temperature=temperature))[0]
            text = m.tokenizer.decode([t for t in tokens if t != m.tokenizer.eos_id])
            cut = min((text.index(s) for s in until if s and s in text), default=len(text))
            out.append(text[:cut])
        return out


if _register is not None:
    ZooLM = _register("zoo")(ZooLM)
