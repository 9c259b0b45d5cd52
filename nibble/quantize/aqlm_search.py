"""AQLM code update: beam search over the codes of one weight group at a time.

Objective: L = trace((W - Ŵ) H (W - Ŵ)ᵀ) with Ŵ[o, group j] = s[o] · Σ_m C[m, code[o, j, m]].

Changing the codeword sum of row ``o`` in group ``j`` by δ (a g-vector, in codebook units) changes L
by  -2 s δ·(RH)[o, j] + s² δᵀ H_jj δ,  where R = W - Ŵ and H_jj is the g×g diagonal block of H.
For one codebook ``m`` the candidates are δ = u + C[m, k] (u: the hypothesis' δ with its code ``m``
taken out), so all 2**B candidates of all rows are scored by one matrix product
``[rows·beam, g] @ [g, 2**B]`` plus the precomputed codeword energies ``C[m,k]ᵀ H_jj C[m,k]``.

Groups are visited in order (Gauss–Seidel: later groups see the improved residual); ``RH`` is kept
exact inside a block of columns and brought up to date for the other columns by one matrix product
per block, as GPTQ does. Every group ends with an exact check that the chosen codes lower L (the
starting codes are always among the hypotheses), so the search never returns worse codes.
"""

from __future__ import annotations

import torch

#: Upper bound on the number of candidate scores held at once (rows × beam × 2**B); 16 Mi floats.
MAX_SCORE_ELEMENTS = 1 << 24


def _argmin_rows(scores: torch.Tensor) -> torch.Tensor:
    """Index of a minimum of every row of [R, L] as [R, 1] (the first one but for exact ties).

    Faster than ``argmin`` on CPU: a vectorised ``amin`` over 8 interleaved slices finds the column
    of the minimum, then ``argmin`` over just 8 values finds the slice.
    """
    rows, length = scores.shape
    if length % 8 or length < 256:
        return scores.argmin(-1, keepdim=True)
    width = length // 8
    slices = scores.view(rows, 8, width)
    column = slices.amin(1).argmin(-1)                                                   # [R]
    which = torch.gather(slices, 2, column[:, None, None].expand(rows, 8, 1)).squeeze(-1).argmin(-1)
    return (which * width + column)[:, None]


def _search_rows(
    grad: torch.Tensor,
    scale: torch.Tensor,
    hjj: torch.Tensor | None,
    energy: torch.Tensor,
    codebooks: torch.Tensor,
    start: torch.Tensor,
    beam_size: int,
    first_codebook: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Beam search for independent rows that share one g×g metric ``hjj`` (None: identity).

    grad [N, g]: (RH) restricted to the group; scale [N]; energy [M, K] = C[m,k]ᵀ hjj C[m,k];
    start [N, M] current code indices. Returns (codes [N, M], delta [N, g], gain [N]) where
    ``gain`` is the exact change of L (< 0) for rows that improve; other rows keep ``start``.
    """
    num_rows, group_size = grad.shape
    num_codebooks, codebook_size, _ = codebooks.shape
    s = scale[:, None]
    s2 = s * s
    hyp_codes = start[:, None, :]                                        # [N, b, M]
    hyp_delta = grad.new_zeros(num_rows, 1, group_size)                  # [N, b, g]
    for step in range(num_codebooks):
        m = (first_codebook + step) % num_codebooks
        book = codebooks[m]                                              # [K, g]
        u = hyp_delta - book[hyp_codes[..., m]]                          # [N, b, g]
        u_h = u if hjj is None else u @ hjj
        base = s2 * (u * u_h).sum(-1) - 2 * s * (u * grad[:, None, :]).sum(-1)          # [N, b]
        linear = (2 * s2)[..., None] * u_h - (2 * s)[..., None] * grad[:, None, :]      # [N, b, g]
        num_hyp = u.shape[1]
        # one GEMM scores every candidate: [linear | base | s²] @ [Cᵀ ; 1 ; energy]
        lhs = torch.cat([linear, base[..., None], s2[..., None].expand(num_rows, num_hyp, 1)], dim=-1)
        rhs = torch.cat([book.t(), torch.ones_like(energy[m])[None], energy[m][None]], dim=0)
        scores = lhs.reshape(num_rows * num_hyp, group_size + 2) @ rhs
        if beam_size == 1 or step == num_codebooks - 1:
            best = _argmin_rows(scores.view(num_rows, num_hyp * codebook_size))
        else:
            width = min(beam_size, num_hyp * codebook_size)
            best = scores.view(num_rows, num_hyp * codebook_size).topk(width, dim=-1, largest=False).indices
        hyp_index = torch.div(best, codebook_size, rounding_mode="floor")          # [N, b']
        code_index = best - hyp_index * codebook_size
        hyp_codes = torch.gather(hyp_codes, 1, hyp_index[..., None].expand(-1, -1, num_codebooks)).clone()
        hyp_codes[..., m] = code_index
        hyp_delta = torch.gather(u, 1, hyp_index[..., None].expand(-1, -1, group_size)) + book[code_index]
    codes = hyp_codes[:, 0, :]
    # recompute δ from the codes themselves, then the exact gain; keep only strict improvements
    delta = sum(codebooks[m][codes[:, m]] - codebooks[m][start[:, m]] for m in range(num_codebooks))
    delta_h = delta if hjj is None else delta @ hjj
    gain = scale * scale * (delta * delta_h).sum(-1) - 2 * scale * (delta * grad).sum(-1)
    improved = gain < 0
    codes = torch.where(improved[:, None], codes, start)
    delta = torch.where(improved[:, None], delta, torch.zeros_like(delta))
    gain = torch.where(improved, gain, torch.zeros_like(gain))
    return codes, delta, gain


def _search_rows_chunked(grad, scale, hjj, energy, codebooks, start, beam_size, first_codebook=0):
    num_rows = grad.shape[0]
    width = codebooks.shape[1] * beam_size
    chunk = max(1, MAX_SCORE_ELEMENTS // width)
    if num_rows <= chunk:
        return _search_rows(grad, scale, hjj, energy, codebooks, start, beam_size, first_codebook)
    parts = [_search_rows(grad[i:i + chunk], scale[i:i + chunk], hjj, energy, codebooks,
                          start[i:i + chunk], beam_size, first_codebook) for i in range(0, num_rows, chunk)]
    return tuple(torch.cat(p) for p in zip(*parts))


def codeword_energy(codebooks: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
    """[M, K]: C[m,k]ᵀ metric C[m,k] (squared norm when ``metric`` is None)."""
    if metric is None:
        return (codebooks * codebooks).sum(-1)
    return ((codebooks @ metric) * codebooks).sum(-1)


@torch.no_grad()
def beam_search(
    weight: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    hessian: torch.Tensor | None = None,
    beam_size: int = 4,
    mask: torch.Tensor | None = None,
    block_groups: int = 16,
    residual_hessian: torch.Tensor | None = None,
    return_residual_hessian: bool = False,
    first_codebook: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """New code indices [out, in/g, M] (int64) that approximate ``weight`` at least as well as ``codes``.

    weight [out, in] float32; codes [out, in/g, M] int64 indices; codebooks [M, K, g]; scales [out];
    hessian [in, in] (None: plain squared error, every group independent); mask [out, in/g] bool:
    only these groups may change. ``residual_hessian`` may pass (W - Ŵ) H when the caller has it;
    with ``return_residual_hessian`` the (incrementally updated) (W - Ŵ_new) H is returned too.
    Codebooks are searched in the order ``first_codebook``, ``first_codebook + 1``, ... (cyclic).
    """
    out_features, in_features = weight.shape
    num_codebooks, _, group_size = codebooks.shape
    num_groups = in_features // group_size
    codes = codes.clone()
    codebooks = codebooks.float()
    scales = scales.float().reshape(-1)
    if mask is not None:
        mask = mask.to(codes.device, torch.bool).reshape(out_features, num_groups)
        if not mask.any():
            return (codes, residual_hessian) if return_residual_hessian and hessian is not None else codes

    if hessian is None:
        # groups are independent: one search over all selected (row, group) pairs at once
        from nibble.formats.aqlm import dequantize_additive

        residual = (weight - dequantize_additive(codes, codebooks, scales)).reshape(out_features, num_groups,
                                                                                    group_size)
        row_scale = scales[:, None].expand(out_features, num_groups)
        flat = torch.ones(out_features, num_groups, dtype=torch.bool, device=codes.device) if mask is None else mask
        energy = codeword_energy(codebooks, None)
        new, _, _ = _search_rows_chunked(residual[flat], row_scale[flat], None, energy, codebooks,
                                         codes[flat], beam_size, first_codebook)
        codes[flat] = new
        return codes

    hessian = hessian.to(weight.device, torch.float32)
    if residual_hessian is None:
        from nibble.formats.aqlm import dequantize_additive

        residual_hessian = (weight - dequantize_additive(codes, codebooks, scales)) @ hessian
    else:
        residual_hessian = residual_hessian.clone()
    block_cols = block_groups * group_size
    for start_col in range(0, in_features, block_cols):
        end_col = min(start_col + block_cols, in_features)
        local = residual_hessian[:, start_col:end_col].clone()
        change = torch.zeros(out_features, end_col - start_col, device=weight.device)
        for j in range(start_col // group_size, end_col // group_size):
            cols = slice(j * group_size, (j + 1) * group_size)
            local_cols = slice(j * group_size - start_col, (j + 1) * group_size - start_col)
            hjj = hessian[cols, cols]
            energy = codeword_energy(codebooks, hjj)
            if mask is None:
                new, delta, _ = _search_rows_chunked(local[:, local_cols], scales, hjj, energy, codebooks,
                                                     codes[:, j], beam_size, first_codebook)
                codes[:, j] = new
                step = scales[:, None] * delta
            else:
                rows = mask[:, j].nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                new, delta, _ = _search_rows_chunked(local[rows, local_cols], scales[rows], hjj, energy,
                                                     codebooks, codes[rows, j], beam_size, first_codebook)
                codes[rows, j] = new
                step = torch.zeros(out_features, group_size, device=weight.device)
                step[rows] = scales[rows, None] * delta
            change[:, local_cols] = step
            local -= step @ hessian[cols, start_col:end_col]
        residual_hessian -= change @ hessian[start_col:end_col, :]
    return (codes, residual_hessian) if return_residual_hessian else codes
