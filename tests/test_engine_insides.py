"""The engine's insides (issue 25): the typed sampling errors, the one row / position / cache-window layout, the
abstract Backend and the shared input checks. Fast, torch-free, no bundle."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from larp_rt import checks
from larp_rt.backends.base import Backend, ContinuousBatch, device_row_exception
from larp_rt.backends.layout import RowLayout, cache_slots, cache_window, rebind_width, step_position, window_width
from larp_rt.config import GeneratorConfig, TokenizerConfig
from larp_rt.errors import (
    BackendCapabilityError,
    NonFiniteLogitsError,
    SamplingError,
    SamplingParamsError,
    kernel_error,
)
from larp_rt.sampling import SamplingParams, resolve_params, sample


def test_sampler_errors_are_typed_value_errors_naming_their_row():
    params = resolve_params(SamplingParams(seed=1), 3)
    logits = np.zeros((3, 8), np.float32)
    logits[2, 5] = np.nan
    with pytest.raises(NonFiniteLogitsError, match=r"cond_logits contain NaN/Inf \(first at row 2, token 5\)") as e:
        sample(logits, None, params, 0)
    assert isinstance(e.value, ValueError) and e.value.row == 2
    again = pickle.loads(pickle.dumps(e.value))
    assert type(again) is NonFiniteLogitsError and again.row == 2 and str(again) == str(e.value)
    bad = resolve_params([SamplingParams(seed=1), SamplingParams(seed=2), SamplingParams(seed=3)], 3)
    bad.temperature[1] = np.nan
    with pytest.raises(SamplingParamsError, match=r"temperature\[1\] = nan: must be") as e:
        sample(np.zeros((3, 8), np.float32), None, bad, 0)
    assert e.value.row == 1


def test_kernel_messages_are_typed_once_where_they_cross():
    e = kernel_error("larp_rt.Sample: cond_logits contain NaN/Inf (first at row 3, token 1): the model ...")
    assert type(e) is NonFiniteLogitsError and e.row == 3
    e = kernel_error("larp_rt.Sample: top_p[4] = 0: must be in (0, 1]")
    assert type(e) is SamplingParamsError and e.row == 4
    assert type(kernel_error("something else")) is ValueError
    assert type(device_row_exception(-1)) is NonFiniteLogitsError
    assert type(device_row_exception(-2)) is SamplingParamsError
    assert not isinstance(device_row_exception(-7), SamplingError)


def test_row_layout_positions_and_cache_windows():
    lay = RowLayout.offline(np.array([True, False, True]))
    np.testing.assert_array_equal(lay.rows, [0, 1, 2])
    np.testing.assert_array_equal(lay.null_rows, [3, -1, 4])
    assert lay.num_rows == 5 and lay.any_guided
    np.testing.assert_array_equal(lay.sample_rows(), [0, 1, 2, 3, 1, 4])
    np.testing.assert_array_equal(lay.sample_rows(np.array([1])), [1, 1])  # paired: the batch is guided
    np.testing.assert_array_equal(lay.row_request(8), [0, 1, 2, 0, 2, -1, -1, -1])
    np.testing.assert_array_equal(lay.row_values(np.array([7, 8, 9]), 99, 6), [7, 8, 9, 99, 99, 0])
    plain = RowLayout.offline(np.zeros(2, bool))
    np.testing.assert_array_equal(plain.sample_rows(), [0, 1])
    assert plain.num_rows == 2
    # step 0 prefills at 0; step k >= 1 feeds at prefix_len - 1 + k
    assert step_position(0, 1) == 0 and step_position(3, 1) == 3 and step_position(1, 257) == 257
    np.testing.assert_array_equal(step_position(np.array([0, 1, 5]), 4), [0, 4, 8])
    assert cache_slots(257) == 264 and cache_slots(256) == 256
    S = 264
    w = cache_window(S)
    assert w == 33 and cache_window(64) == 16
    assert window_width(0, w, S) == 33 and window_width(33, w, S) == 66 and window_width(263, w, S) == S
    assert rebind_width(10, w, S, 0) == 33 and rebind_width(10, w, S, 33) is None
    assert rebind_width(10, w, S, 132) == 33  # the longest row left: halve (or more)


def test_backend_is_abstract_and_optional_parts_say_which_backend_has_them():
    with pytest.raises(TypeError):
        Backend(None, None)

    class Minimal(Backend):
        name = "minimal"

        def encode(self, video):
            return video

        def decode(self, tokens):
            return tokens

        def new_runner(self, capacity):
            raise NotImplementedError

    be = Minimal(None, None)
    with pytest.raises(BackendCapabilityError, match="backend 'minimal' has no stochastic encoder.*onnxruntime"):
        be.encode_latents(np.zeros((1, 3, 4, 8, 8), np.float32))
    with pytest.raises(NotImplementedError, match="AR prior"):
        be.prior_runner(1)
    assert be.prior_graph_name is None
    with pytest.raises(ValueError, match="no generator"):
        ContinuousBatch(be, None)


def test_checks_module_words_what_the_engine_words():
    tok = TokenizerConfig.from_name("tiny")
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, "):
        checks.check_tokens(np.zeros((1, 3), np.int64), tok)
    gen = GeneratorConfig.from_name("tiny")
    np.testing.assert_array_equal(checks.check_class_ids(3, gen), [3])
    with pytest.raises(ValueError, match="class_ids must be in"):
        checks.check_class_ids([gen.num_classes], gen)
    with pytest.raises(ValueError, match="seed must be a non-negative int or None"):
        checks.check_seed(-1)
    with pytest.raises(ValueError, match="stream must be an int"):
        checks.check_request_args(None, -1, None, None)


def test_the_cpu_kernel_raises_the_same_typed_errors():
    """The C++ sampler's refusals cross into Python typed (kernels.library.raise_last_error -> kernel_error), with
    the reference's row: callers test isinstance, never the message."""
    from larp_rt import kernels

    if kernels.cpu_library() is None or kernels.disabled():
        pytest.skip("the CPU kernels are not built (pip install -e .)")
    params = resolve_params(SamplingParams(seed=1), 3)
    logits = np.zeros((3, 8), np.float32)
    logits[1, 4] = np.inf
    with pytest.raises(NonFiniteLogitsError) as e:
        kernels.sample_numpy(logits, None, params, 0)
    assert e.value.row == 1
    bad = resolve_params([SamplingParams(seed=1), SamplingParams(seed=2), SamplingParams(seed=3)], 3)
    bad.top_p[2] = 0.0
    with pytest.raises(SamplingParamsError) as e:
        kernels.sample_numpy(np.zeros((3, 8), np.float32), None, bad, 0)
    assert e.value.row == 2 and "top_p" in str(e.value)
