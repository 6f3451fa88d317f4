"""Planted bugs in science code issue 21 did not name: the states inside blocks, the evaluation's
half-layer rows, the tuned-lens import, the Jacobian lens, the training of a lens inside the blocks,
the least-squares start of a tuned lens, the comparison of two lenses, the family rule that keeps a
forward pass in float32, the translators and the last layer's decoding kept in float32 inside a
bfloat16 block, the limericks kept out of the corpus's fortunes, the evaluation's paired
differences, its top-1 agreement at tied maxima and its bias bootstrap's rest bucket, and cached
generation on a model without a key-value cache.
:mod:`planted_bugs` merges :data:`LENS_PLANTS` into its table; run one as::

    python benchmarks/planted_bugs.py mid_state_previous_attention
"""

from __future__ import annotations

from collections.abc import Callable


def _mid_state_previous_attention() -> None:
    """Mid state ``i`` adds the attention of block ``i − 1`` (state 0 adds none): ``resid.i + attn.(i−1)``."""
    import torch

    from depthlens.model import hidden_states

    real = hidden_states.run_with_hooks

    def run_with_hooks(model, input_ids, attention_mask=None, *, read=(), **kwargs):
        read = list(read)
        wanted = [int(point.split(".")[1]) for point in read if point.startswith("attn.")]
        extra = [f"attn.{i - 1}" for i in wanted if i]
        run = real(model, input_ids, attention_mask, read=list(dict.fromkeys([*read, *extra])), **kwargs)
        values = dict(run.values)
        for i in wanted:
            values[f"attn.{i}"] = run.values[f"attn.{i - 1}"] if i else torch.zeros_like(run.values["attn.0"])
        return hidden_states.replace(run, values=values)

    hidden_states.run_with_hooks = run_with_hooks


def _eval_mid_rows_at_whole_layers() -> None:
    """The evaluation places a lens inside the blocks at layers ``i``, not ``i + 0.5``."""
    from depthlens.analysis import evaluate

    real = evaluate.depth
    evaluate.depth = lambda layer, site, num_layers: real(layer, "block", num_layers)


def _tuned_lens_import_transposed() -> None:
    """A tuned-lens folder's translators are imported transposed (``W_iᵀ`` for ``W_i``)."""
    from depthlens.lenses import tuned_lens_format

    real = tuned_lens_format.read_translators

    def read_translators(folder, parts):
        config, translators = real(folder, parts)
        return config, [(weight.T.contiguous(), bias) for weight, bias in translators]

    tuned_lens_format.read_translators = read_translators


def _jacobian_lens_transposed() -> None:
    """The J-lens reads ``h`` through ``J_lᵀ`` instead of ``J_l``."""
    import torch

    from depthlens.lenses.jacobian import JacobianLens

    def transform(self, hidden, layer):
        matrix = self.matrix(layer)
        return hidden if matrix is None else hidden.to(matrix.device, torch.float32) @ matrix

    JacobianLens.transform = transform


def _mid_lens_trained_on_block_outputs() -> None:
    """``depthlens train --site mid`` fits and trains its translators on block outputs, not mid states."""
    from depthlens.model.hidden_states import capture
    from depthlens.training import train

    train.capture = lambda *args, site="block", **kwargs: capture(*args, site="block", **kwargs)


def _ridge_penalises_the_bias() -> None:
    """The least-squares start's ridge penalty also falls on the translators' biases."""
    from depthlens.training.closed_form import LeastSquares

    real = LeastSquares.solve

    def solve(self, ridge=1e-3):
        saved, d = self.xtx.clone(), self.xty.shape[-1]
        for xtx in self.xtx:
            xtx[d, d] += ridge * xtx.diagonal()[:d].mean()
        try:
            return real(self, ridge)
        finally:
            self.xtx.copy_(saved)

    LeastSquares.solve = solve


def _compare_tv_doubled() -> None:
    """compare_lenses reports ``Σ |p_a − p_b|`` as the total variation, without the ½."""
    from depthlens.analysis import compare

    real = compare.tv
    compare.tv = lambda log_p, log_q: 2 * real(log_p, log_q)


def _forward_rule_ignored() -> None:
    """Every family's forward pass runs in bfloat16 with the decoding, gemma3's too."""
    from depthlens.model.architecture import ModelParts

    ModelParts.forward_dtype = lambda self, products: products


def _missing_cache_passed_on() -> None:
    """A forward pass that returned no key-value cache hands on ``None``, and the next cached step
    sees only its new token (RWKV's recurrent state is read as no cache at all)."""
    from depthlens.analysis import generate

    real = generate.output_cache

    def output_cache(output):
        return real(output) if any(name in output.keys() for name in ("cache", "past_key_values")) else None  # noqa: SIM118

    generate.output_cache = output_cache


def _translators_in_bfloat16() -> None:
    """A tuned lens's translators run under autocast with the decoding, in bfloat16."""
    from contextlib import nullcontext

    from depthlens.lenses import tuned

    tuned.full_precision = lambda device="cpu": nullcontext()


def _last_layer_like_the_others() -> None:
    """The last layer is decoded in the products' precision even where the family keeps its
    forward pass, and so its output head, in float32."""
    from contextlib import nullcontext

    from depthlens.lenses import readout

    readout.full_precision = lambda device="cpu": nullcontext()


def _limericks_in_fortunes() -> None:
    """The ``fortunes`` kind keeps the fortunes laid out as limericks."""
    from depthlens.text import corpus

    corpus.is_limerick_shaped = lambda text: False
    corpus.kind_documents.cache_clear()


def _paired_difference_reversed() -> None:
    """The evaluation's paired differences are baseline − lens instead of lens − baseline."""
    from depthlens.analysis import evaluate

    real = evaluate._differences

    def differences(*args, **kwargs):
        rows = real(*args, **kwargs)
        for row in rows:
            row["value"] = -row["value"]
            if row["ci_low"] is not None:
                row["ci_low"], row["ci_high"] = -row["ci_high"], -row["ci_low"]
        return rows

    evaluate._differences = differences


def _bias_rest_by_subtraction() -> None:
    """The bias bootstrap's rest bucket is the total minus the head tokens' sum, float32 rounding and all."""
    import torch

    from depthlens.analysis import evaluate

    def head_and_rest(sums):
        if sums.shape[-1] <= evaluate.BIAS_HEAD_TOKENS + 1:
            return sums
        kept = sums[..., sums.sum((0, 1)).topk(evaluate.BIAS_HEAD_TOKENS).indices]
        return torch.cat([kept, (sums.sum(-1) - kept.sum(-1)).clamp_min(0.0)[..., None]], -1)

    evaluate._head_and_rest = head_and_rest


def _ties_count_as_agreement() -> None:
    """Top-1 agreement counts a tie at the lens's maximum as full agreement."""
    from depthlens.stats import logit_statistics

    real = logit_statistics.LogitStatistics.__call__

    def call(self, logits, k=0, into=None, ranks=True):
        scores = real(self, logits, k, into, ranks)
        if scores.top1_share is not None:
            scores.top1_share = (scores.rank == 0).float()
        return scores

    logit_statistics.LogitStatistics.__call__ = call


def _compiled_marginals_unnormalised() -> None:
    """The compiled kernel adds ``exp(z − max z)`` to the group sums instead of ``q``."""
    from depthlens.stats import fused

    def scores_into(z, probs, top1, targets, floor, width, groups, totals):
        shifted, _, sums = fused._sums(z, probs, top1, targets, floor, width)
        totals.index_add_(0, groups, shifted.clamp_min(floor).exp())
        return sums

    fused._scores_into = scores_into


def _compiled_maximum_without_last_run() -> None:
    """The compiled kernel takes a row's maximum from its full runs only, leaving out the short last run."""
    import torch

    from depthlens.stats import fused

    class TorchWithoutMaximum:
        maximum = staticmethod(lambda first, second: first)

        def __getattr__(self, name):
            return getattr(torch, name)

    fused.torch = TorchWithoutMaximum()


LENS_PLANTS: dict[str, tuple[Callable[[], None], list[str]]] = {
    "forward_rule_ignored": (_forward_rule_ignored, ["tests/test_precision.py"]),
    "translators_in_bfloat16": (_translators_in_bfloat16, ["tests/test_precision.py"]),
    "last_layer_like_the_others": (_last_layer_like_the_others, ["tests/test_precision.py"]),
    "limericks_in_fortunes": (_limericks_in_fortunes, ["tests/test_verse.py"]),
    "ties_count_as_agreement": (_ties_count_as_agreement, ["tests/test_logit_statistics.py"]),
    "compiled_marginals_unnormalised": (_compiled_marginals_unnormalised, ["tests/test_logit_statistics.py"]),
    "compiled_maximum_without_last_run": (_compiled_maximum_without_last_run, ["tests/test_logit_statistics.py"]),
    "paired_difference_reversed": (_paired_difference_reversed, ["tests/test_evaluate.py"]),
    "bias_rest_by_subtraction": (_bias_rest_by_subtraction, ["tests/test_evaluate.py"]),
    "missing_cache_passed_on": (_missing_cache_passed_on, ["tests/test_generate.py"]),
    "mid_state_previous_attention": (_mid_state_previous_attention, ["tests/test_mid_block.py"]),
    "eval_mid_rows_at_whole_layers": (_eval_mid_rows_at_whole_layers, ["tests/test_mid_block.py"]),
    "tuned_lens_import_transposed": (_tuned_lens_import_transposed, ["tests/test_tuned_lens_format.py"]),
    "jacobian_lens_transposed": (_jacobian_lens_transposed, ["tests/test_jacobian.py"]),
    "mid_lens_trained_on_block_outputs": (_mid_lens_trained_on_block_outputs, ["tests/test_mid_block.py"]),
    "least_squares_ridge_penalises_bias": (_ridge_penalises_the_bias, ["tests/test_train.py"]),
    "compare_tv_doubled": (_compare_tv_doubled, ["tests/test_readout.py"]),
}
