import pytest
import torch

from larp_rt import GeneratorConfig
from larp_rt.models import LARPGenerator


def make(dtype=torch.float64, **overrides) -> LARPGenerator:
    torch.manual_seed(0)
    m = LARPGenerator(GeneratorConfig.from_name("tiny", **overrides)).to(dtype).eval()
    torch.nn.init.normal_(m.output.weight, std=0.05)  # the authors' init zeroes it: logits would all be 0
    return m


def cached_logits(m: LARPGenerator, cond: torch.Tensor, tokens: torch.Tensor, max_batch: int | None) -> torch.Tensor:
    """Prefill + one token at a time; returns (B, L + 1, V) like the full forward (max_batch None: reuse caches)."""
    if max_batch is not None:
        m.setup_caches(max_batch)
    out = [m.prefill(cond)]
    for i in range(tokens.shape[1]):
        pos = torch.tensor([m.config.cls_token_num + i])
        out.append(m.decode_one_token(tokens[:, i : i + 1], pos))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("cfg_rows", [False, True])
def test_cached_decoding_equals_full_forward_float64(cfg_rows):
    m = make()
    L = m.config.max_seq_len - 1  # a whole video: prefix + 63 fed tokens -> 64 predictions
    classes = torch.tensor([0, 3, 7])
    tokens = torch.randint(0, m.config.vocab_size, (3, L), generator=torch.Generator().manual_seed(1))
    if cfg_rows:  # CFG: cond rows then null-class rows, same tokens
        classes = torch.cat([classes, torch.full_like(classes, m.config.null_class)])
        tokens = torch.cat([tokens, tokens])
    with torch.no_grad():
        full = m(classes, tokens)
        cached = cached_logits(m, classes, tokens, max_batch=len(classes) + 2)  # cache larger than the batch
    assert full.shape == cached.shape == (len(classes), L + 1, m.config.vocab_size)
    assert (full - cached).abs().max().item() <= 1e-10
    assert full.abs().max() > 0.1  # not trivially zero
    if cfg_rows:
        cond, uncond = cached.chunk(2)
        fcond, funcond = full.chunk(2)
        mix = uncond + (cond - uncond) * 1.25
        assert (mix - (funcond + (fcond - funcond) * 1.25)).abs().max().item() <= 1e-10
        assert not torch.allclose(cond, uncond)  # the null class changes the distribution


def test_staggered_per_row_steps_equal_full_forward_float64():
    """Continuous batching at the model level: rows start at different steps (a row joins by feeding its class
    token at position 0 while the others are mid-sequence), one ``step`` runs all of them at their own positions,
    and a finished row's slot is taken by a new request over its stale cache. Each row's logits equal the full
    causal forward of its own sequence (float64, 1e-10)."""
    m = make()
    cfg = m.config
    V, N = cfg.vocab_size, 20
    g = torch.Generator().manual_seed(5)
    # (row, class, start step): row 1 is reused by request 3 after request 1 ends at step 12
    reqs = [(0, 2, 0), (1, 5, 2), (2, cfg.null_class, 7), (1, 6, 12 + 1)]
    tokens = {i: torch.randint(0, V, (N,), generator=g) for i in range(len(reqs))}
    ends = {0: 0 + N, 1: 12, 2: 7 + N, 3: 13 + N}
    got: dict[int, list] = {i: [] for i in range(len(reqs))}
    m.setup_caches(3)
    with torch.no_grad():
        for t in range(13 + N):
            live = [(i, r) for i, r in enumerate(reqs) if r[2] <= t < ends[i]]
            tok = torch.zeros(3, dtype=torch.int64)
            pos = torch.zeros(3, dtype=torch.int64)
            for i, (row, c, start) in live:
                k = t - start  # this request's step: 0 = prefill (class token at position 0)
                tok[row] = V + c if k == 0 else tokens[i][k - 1]
                pos[row] = k
            logits = m.step(tok, pos)
            for i, (row, _, _) in live:
                got[i].append(logits[row])
        for i, (_, c, start) in enumerate(reqs):
            n = ends[i] - start
            full = m(torch.tensor([c]), tokens[i][None, : n - 1])[0]  # (n, V)
            assert (torch.stack(got[i]) - full).abs().max().item() <= 1e-10, f"request {i}"


def test_rows_are_independent_of_batch_composition():
    m = make()
    tokens = torch.randint(0, m.config.vocab_size, (4, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        big = cached_logits(m, torch.tensor([1, 2, 3, 4]), tokens, max_batch=4)
        one = cached_logits(m, torch.tensor([3]), tokens[2:3], max_batch=4)
    assert (big[2:3] - one).abs().max().item() <= 1e-12


def test_caches_are_allocated_once_and_reused_across_generations():
    m = make()
    gen = torch.Generator().manual_seed(3)
    long = torch.randint(0, m.config.vocab_size, (2, 20), generator=gen)
    short = torch.randint(0, m.config.vocab_size, (2, 5), generator=gen)
    with torch.no_grad():
        m.setup_caches(2)
        k = m.layers[0].attention.kv_cache.k_cache
        cached_logits(m, torch.tensor([4, 5]), long, max_batch=None)  # leaves stale entries at positions 6..20
        again = cached_logits(m, torch.tensor([1, 2]), short, max_batch=None)
        fresh = m(torch.tensor([1, 2]), short)
    assert m.layers[0].attention.kv_cache.k_cache is k  # same buffer, no reallocation
    assert (again - fresh).abs().max().item() <= 1e-10  # stale positions are masked out
    assert m.cache_shape == (2, 64)  # 1 + 64 - 1 positions rounded up to 8
    m.clear_caches()
    assert m.cache_shape is None


def test_frame_prediction_variant_prefix_tokens():
    m = make(frame_prediction=True, cls_token_num=9)
    cfg = m.config
    assert m.cls_embedding is None and m.tok_embeddings.num_embeddings == cfg.vocab_size + 1
    assert m.abs_pe.shape[1] == cfg.max_seq_len + 9 - 1
    prefix = torch.randint(0, cfg.vocab_size, (2, 9))
    prefix[:, -1] = cfg.vocab_size  # separator token
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = m(prefix, tokens)
        cached = cached_logits(m, prefix, tokens, max_batch=2)
    assert (full - cached).abs().max().item() <= 1e-10


def test_prefill_validates_its_inputs():
    m = make()
    with pytest.raises(RuntimeError, match="setup_caches"):
        m.prefill(torch.tensor([0]))
    m.setup_caches(2)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 8\].*null class 8"):
        m.prefill(torch.tensor([9]))
    with pytest.raises(ValueError, match="class ids"):
        m.prefill(torch.tensor([-1]))
    with pytest.raises(ValueError, match="cache holds 1..2"):
        m.prefill(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="int64/int32"):
        m.prefill(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="max_batch"):
        m.setup_caches(0)


def test_no_null_class_without_class_dropout():
    m = make(class_dropout_prob=0.0)
    assert not m.has_null_class and m.cls_embedding.embedding_table.num_embeddings == 8
    m.setup_caches(1)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 7\]"):
        m.prefill(torch.tensor([8]))


def test_class_dropout_in_training_uses_the_given_generator():
    m = make(class_dropout_prob=0.5).train()
    emb = m.cls_embedding
    labels = torch.arange(8).repeat(8)
    a = emb(labels, generator=torch.Generator().manual_seed(0))
    b = emb(labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    null = emb.embedding_table.weight[8]
    dropped = (a == null).all(-1).float().mean().item()
    assert 0.3 < dropped < 0.7


def test_rmsnorm_runs_in_fp32_for_half_inputs():
    m = make(dtype=torch.bfloat16)
    m.setup_caches(1)
    with torch.no_grad():
        logits = m.prefill(torch.tensor([1]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
