"""Direct logit attribution term by term, against an oracle that shares none of its arithmetic.

DLA says: with the final norm's scale frozen at its clean value, the decoding is affine, so each
part of the model contributes ``u · part`` to the logit. The oracle here does the experiment
instead: it removes one part from the last residual state and decodes the result through the
model's own final norm module, rescaled so that its scale stays at the clean value
(``N(x) · σ(x) / σ(x*)``, plus the norm's bias β added back for a LayerNorm), then through the
unembedding. The logit drops by exactly that part's term. A part is found by running the
model's own projection with and without it: head ``h`` is ``W_O(z) − W_O(z with z_h = 0)``, the
output projection's bias ``W_O(0)``, neuron ``n`` ``W_down(a) − W_down(a with a_n = 0)``. Where a
sandwich norm ends the branch (Gemma 2, OLMo 2) the part is removed before it, with that norm's
scale frozen the same way.

The models have non-zero biases and norm gains away from 1 (``tiny_models.perturb``).

Tolerance: the norms compute in float32 whatever the model's dtype, so a decoded logit carries a
relative rounding error of a few float32 epsilons (ε = 1.2e-7) of the sum ``Σ_d |u_d x_d|`` it adds
up; we allow 64 ε times that sum (≈ 1e-6 here), where the planted bugs below are off by 1e-3 or more.
"""

from collections.abc import Callable

import pytest
import torch
from tiny_models import tiny_model

from depthlens import find_parts
from depthlens.analysis.dla import logit_attribution
from depthlens.model.architecture import ModelParts
from depthlens.model.hooks import points, replace, run_with_hooks

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 61, 7]])
POSITION = 5
EPS32 = torch.finfo(torch.float32).eps
CASES = {
    "llama": {},
    "llama tied": {"tie_word_embeddings": True},
    "gpt2": {},
    "opt": {},
    "phi": {},
    "gpt_neox": {},
    "bloom": {},
    "gemma2": {"final_logit_softcapping": 5.0},
    "olmo2": {},
}
"""Families by what they test: RMSNorm (Llama, untied and tied), LayerNorm with biases and
GPT-2's transposed ``Conv1D`` (GPT-2), a final LayerNorm and an inline MLP (OPT), a parallel block
and an unembedding bias (Phi), NeoX, branches that add the residual themselves (BLOOM), sandwich
norms with soft-capping (Gemma 2), sandwich norms without pre-norms (OLMo 2)."""


def _norm_eps(norm: torch.nn.Module) -> float:
    return next(float(getattr(norm, a)) for a in ("eps", "variance_epsilon") if hasattr(norm, a))


def frozen(norm: torch.nn.Module, clean: torch.Tensor, centred: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``norm`` with its scale frozen at ``clean [d]``: ``x ↦ (N(x) − β) σ(x) / σ(clean) + β``, where
    ``σ`` is the norm's own root mean square (of the centred ``x`` for a LayerNorm) with its ε."""
    eps = _norm_eps(norm)
    beta = norm.bias.detach() if centred and getattr(norm, "bias", None) is not None else 0.0

    def sigma(x: torch.Tensor) -> torch.Tensor:
        c = x - x.mean(-1, keepdim=True) if centred else x
        return (c.double().pow(2).mean(-1, keepdim=True) + eps).sqrt()

    clean_sigma = sigma(clean)

    def apply(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (norm(x.float()[None])[0].double() - beta) * sigma(x) / clean_sigma + beta

    return apply


def _centred(norm: torch.nn.Module) -> bool:
    return isinstance(norm, torch.nn.LayerNorm)


class Oracle:
    """The clean run of one model at :data:`POSITION`, and the logit after removing a part."""

    def __init__(self, model: torch.nn.Module, target: int) -> None:
        self.model, self.parts, self.target = model, find_parts(model), target
        self.inputs: dict[str, torch.Tensor] = {}
        handles = [
            module.register_forward_pre_hook(lambda _m, args, key=key: self.inputs.__setitem__(key, args[0]))
            for key, module in self._watched().items()
        ]
        with torch.no_grad():
            self.run = run_with_hooks(model, IDS, read=points(self.parts))
        for handle in handles:
            handle.remove()
        self.x = self.value(f"resid.{self.parts.num_layers}")
        norm = self.parts.final_norm[0]
        self.final = frozen(norm, self.x, _centred(norm))
        self.clean_logit = self.logit(self.x)

    def _watched(self) -> dict[str, torch.nn.Module]:
        watched = {}
        for i in range(self.parts.num_layers):
            for kind in ("heads", "neurons", "attn_norm", "mlp_norm"):
                if (module := self.parts.branch(kind, i)) is not None:
                    watched[f"{kind}.{i}"] = module
        return watched

    def value(self, key: str) -> torch.Tensor:
        """A module input recorded here, or else a point read by the hook layer, at :data:`POSITION`: ``[d]``."""
        tensor = self.inputs[key] if key in self.inputs else self.run.values[key]
        return tensor.reshape(-1, tensor.shape[-1])[POSITION].detach()

    def logit(self, x: torch.Tensor, *, drop: str = "") -> float:
        """The pre-soft-cap logit of the target decoded from ``x`` with the final scale frozen;
        ``drop`` = ``"norm bias"`` or ``"unembedding bias"`` decodes without that constant."""
        parts: ModelParts = self.parts
        h = self.final(x)
        if drop == "norm bias":
            h = h - parts.final_norm[0].bias.detach().double()
        with torch.no_grad():
            for module in parts.final_norm[1:]:
                h = module(h.float()[None])[0].double()
            weight = parts.unembedding.weight[self.target].double()
            logit = weight @ h
            if parts.unembedding.bias is not None and drop != "unembedding bias":
                logit = logit + parts.unembedding.bias[self.target].double()
        return float(logit * (parts.logit_multiplier or 1.0) / (parts.logit_divisor or 1.0))

    def removed(self, delta: torch.Tensor) -> float:
        """How much the logit drops when ``delta [d]`` is taken out of the last residual state."""
        return self.clean_logit - self.logit(self.x - delta.double())

    def through_sandwich(self, kind: str, i: int, piece: torch.Tensor) -> torch.Tensor:
        """What removing ``piece`` from the input of block ``i``'s sandwich norm after ``kind``
        removes from its output, with that norm's scale frozen; ``piece`` itself if there is none."""
        norm = self.parts.branch(f"{kind}_norm", i)
        if norm is None:
            return piece.double()
        clean = self.value(f"{kind}_norm.{i}")
        post = frozen(norm, clean, _centred(norm))
        return post(clean) - post(clean - piece)

    def head(self, i: int, h: int, heads: int) -> float:
        projection, z = self.parts.branch("heads", i), self.value(f"heads.{i}")
        width = z.shape[-1] // heads
        without = z.clone()
        without[h * width : (h + 1) * width] = 0
        with torch.no_grad():
            piece = projection(z[None])[0] - projection(without[None])[0]
        return self.removed(self.through_sandwich("attn", i, piece))

    def attention_bias(self, i: int) -> float:
        projection, z = self.parts.branch("heads", i), self.value(f"heads.{i}")
        with torch.no_grad():
            bias = projection(torch.zeros_like(z)[None])[0]
        return self.removed(self.through_sandwich("attn", i, bias))

    def neuron(self, i: int, n: int) -> float:
        projection, a = self.parts.branch("neurons", i), self.value(f"neurons.{i}")
        without = a.clone()
        without[n] = 0
        with torch.no_grad():
            piece = projection(a[None])[0] - projection(without[None])[0]
        return self.removed(self.through_sandwich("mlp", i, piece))

    def mlp_bias(self, i: int) -> float:
        projection, a = self.parts.branch("neurons", i), self.value(f"neurons.{i}")
        with torch.no_grad():
            bias = projection(torch.zeros_like(a)[None])[0]
        return self.removed(self.through_sandwich("mlp", i, bias))

    def mlp(self, i: int) -> float:
        branch = self.value(f"resid.{i + 1}") - self.value(f"resid.{i}") - self.value(f"attn.{i}")
        return self.removed(branch)

    def expected(self, term) -> float:
        """The oracle's value of one DLA term."""
        if term.kind == "head":
            return self.head(term.layer, term.index, self.parts.num_heads)
        if term.kind == "attn_bias":
            return self.attention_bias(term.layer)
        if term.kind == "neuron":
            return self.neuron(term.layer, term.index)
        if term.kind == "mlp":
            return self.mlp(term.layer)
        if term.kind == "embed":
            return self.removed(self.value("resid.0"))
        if term.name == "final norm bias":
            has_bias = getattr(self.parts.final_norm[0], "bias", None) is not None
            return self.clean_logit - self.logit(self.x, drop="norm bias") if has_bias else 0.0
        if term.name == "unembedding bias":
            return self.clean_logit - self.logit(self.x, drop="unembedding bias")
        raise AssertionError(f"no oracle for the term {term.name!r}")

    def tolerance(self) -> float:
        """64 ε₃₂ times ``Σ_d |w_d h_d|``, the size of the sum a decoded logit adds up."""
        weight = self.parts.unembedding.weight[self.target].detach().double()
        size = float((weight * self.final(self.x)).abs().sum())
        return 64 * EPS32 * size * (self.parts.logit_multiplier or 1.0) / (self.parts.logit_divisor or 1.0)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    family = request.param.split()[0]
    model = tiny_model(family, **CASES[request.param])
    attribution = logit_attribution(model, IDS, position=POSITION, neurons=[0, 1, 2], top_neurons=4)
    target = int(model(IDS).logits[0, POSITION].argmax())
    return attribution, Oracle(model, target)


def test_every_term_is_what_removing_its_part_takes_off_the_logit(case):
    attribution, oracle = case
    tolerance = oracle.tolerance()
    checked = {}
    for term in attribution.terms:
        if term.kind in ("mlp_rest", "bias") and term.name not in ("final norm bias", "unembedding bias"):
            continue
        expected = oracle.expected(term)
        assert abs(term.value - expected) <= tolerance, (term.name, term.value, expected, tolerance)
        checked[term.kind] = checked.get(term.kind, 0) + 1
    layers = oracle.parts.num_layers
    assert checked["head"] == layers * oracle.parts.num_heads and checked["attn_bias"] == layers
    assert checked["neuron"] == 4 * layers and checked["embed"] == 1


def test_the_rest_of_an_mlp_is_what_its_other_neurons_and_its_bias_take_off(case):
    attribution, oracle = case
    for i in range(oracle.parts.num_layers):
        rest = next(t.value for t in attribution.terms if t.name == f"L{i}.mlp rest")
        top = [t.index for t in attribution.terms if t.kind == "neuron" and t.layer == i]
        width = oracle.value(f"neurons.{i}").shape[-1]
        others = sum(oracle.neuron(i, n) for n in range(width) if n not in top) + oracle.mlp_bias(i)
        assert abs(rest - others) <= width * oracle.tolerance(), (i, rest, others)


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt"])
def test_whole_mlps_match_the_oracle(name):
    model = tiny_model(name)
    attribution = logit_attribution(model, IDS, position=POSITION)
    oracle = Oracle(model, int(model(IDS).logits[0, POSITION].argmax()))
    for term in (t for t in attribution.terms if t.kind == "mlp"):
        assert abs(term.value - oracle.mlp(term.layer)) <= oracle.tolerance()


def test_the_hook_layer_reads_and_writes_the_projections_inputs(case):
    """``heads.{i}`` and ``neurons.{i}``, which DLA reads, are the inputs of the projections; a
    write there reaches the projection (zeroed heads leave the output projection's bias)."""
    _, oracle = case
    for i in range(oracle.parts.num_layers):
        for kind in ("heads", "neurons"):
            torch.testing.assert_close(oracle.run.values[f"{kind}.{i}"], oracle.inputs[f"{kind}.{i}"], rtol=0, atol=0)
    if oracle.parts.branch("attn_norm", 0) is None and "attn" not in oracle.parts.branches_add_residual:
        zeroed = run_with_hooks(oracle.model, IDS, read=["attn.0"], edits=[replace("heads.0", torch.zeros(1))])
        bias = oracle.parts.branch("heads", 0).bias
        torch.testing.assert_close(zeroed.values["attn.0"][0], bias.detach().expand(IDS.shape[1], -1))


def test_the_models_have_biases_and_gains_for_the_oracle_to_see():
    """Guard for the tests above: a bias left at 0 or a gain at 1 would hide the bugs they plant."""
    oracle = Oracle(tiny_model("gpt2"), 3)
    assert oracle.attention_bias(0) != 0 and oracle.parts.branch("heads", 0).bias.abs().min() > 0
    gains = oracle.parts.final_norm[0].weight
    assert (gains - 1).abs().min() > 0
