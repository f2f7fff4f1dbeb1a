"""Float64 NumPy references for the recurrent cores, written from the papers' equations with explicit
per-token loops and explicit matrices (independent of zoo's jnp code). A token whose segment id
differs from the previous token's starts from the zero state."""

from __future__ import annotations

import numpy as np


def _starts(segments, b, t):
    return t == 0 or segments[b, t] != segments[b, t - 1]


def linear_recurrence(q, k, v, log_decay, segments):
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t (Mamba-2 SSD / RetNet)."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, log_decay))
    batch, length, heads, _ = q.shape
    out = np.zeros((batch, length, heads, v.shape[-1]))
    for b in range(batch):
        state = np.zeros((heads, k.shape[-1], v.shape[-1]))
        for t in range(length):
            if _starts(segments, b, t):
                state[:] = 0
            for h in range(heads):
                state[h] = np.exp(g[b, t, h]) * state[h] + np.outer(k[b, t, h], v[b, t, h])
                out[b, t, h] = state[h].T @ q[b, t, h]
    return out


def retention_parallel(q, k, v, log_gamma):
    """RetNet's parallel form for one document per row: (Q K^T * D) V, D_nm = gamma^(n-m), n >= m."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    length = q.shape[1]
    n, m = np.arange(length)[:, None], np.arange(length)[None, :]
    out = np.zeros((*q.shape[:3], v.shape[-1]))
    for h, lg in enumerate(np.asarray(log_gamma, np.float64)):
        decay = np.where(n >= m, np.exp(lg * (n - m).clip(0)), 0.0)
        out[:, :, h] = np.einsum("bnm,bmv->bnv", np.einsum("bnk,bmk->bnm", q[:, :, h], k[:, :, h]) * decay, v[:, :, h])
    return out


def gated_delta_rule(q, k, v, log_alpha, beta, segments):
    """S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t (S in [K, V])."""
    q, k, v, la, be = (np.asarray(a, np.float64) for a in (q, k, v, log_alpha, beta))
    batch, length, heads, dk = q.shape
    out = np.zeros((batch, length, heads, v.shape[-1]))
    for b in range(batch):
        state = np.zeros((heads, dk, v.shape[-1]))
        for t in range(length):
            if _starts(segments, b, t):
                state[:] = 0
            for h in range(heads):
                kt = k[b, t, h]
                transition = np.exp(la[b, t, h]) * (np.eye(dk) - be[b, t, h] * np.outer(kt, kt))
                state[h] = transition @ state[h] + be[b, t, h] * np.outer(kt, v[b, t, h])
                out[b, t, h] = state[h].T @ q[b, t, h]
    return out


def mlstm(q, k, v, log_i, log_f, segments, eps=1e-6):
    """The xLSTM paper's stabilised mLSTM (q already scaled): m_t = max(log f_t + m_{t-1}, log i_t)."""
    q, k, v, li, lf = (np.asarray(a, np.float64) for a in (q, k, v, log_i, log_f))
    batch, length, heads, dk = q.shape
    out = np.zeros((batch, length, heads, v.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            c, n, m = np.zeros((dk, v.shape[-1])), np.zeros(dk), -np.inf
            for t in range(length):
                if _starts(segments, b, t):
                    c, n, m = np.zeros_like(c), np.zeros_like(n), -np.inf
                m_new = max(lf[b, t, h] + m, li[b, t, h])
                f, i = np.exp(lf[b, t, h] + m - m_new), np.exp(li[b, t, h] - m_new)
                c = f * c + i * np.outer(k[b, t, h], v[b, t, h])
                n = f * n + i * k[b, t, h]
                m = m_new
                denominator = max(abs(n @ q[b, t, h]), np.exp(-m)) + eps
                out[b, t, h] = c.T @ q[b, t, h] / denominator
    return out


def slstm(gates_x, recurrent_kernel, segments):
    """gates_x [B,T,4,H,D] (i, f, z, o pre-activations without the recurrent part); R [H, D, 4, D]."""
    gx, r = np.asarray(gates_x, np.float64), np.asarray(recurrent_kernel, np.float64)
    batch, length, _, heads, dim = gx.shape
    out = np.zeros((batch, length, heads, dim))
    sigmoid = lambda a: 1 / (1 + np.exp(-a))
    for b in range(batch):
        for hd in range(heads):
            h, c, n, m = np.zeros(dim), np.zeros(dim), np.zeros(dim), np.full(dim, -np.inf)
            for t in range(length):
                if _starts(segments, b, t):
                    h, c, n, m = np.zeros(dim), np.zeros(dim), np.zeros(dim), np.full(dim, -np.inf)
                raw = gx[b, t, :, hd] + np.einsum("d,dge->ge", h, r[hd])
                log_f = -np.log1p(np.exp(-raw[1]))
                m_new = np.maximum(log_f + m, raw[0])
                f, i = np.exp(log_f + m - m_new), np.exp(raw[0] - m_new)
                c = f * c + i * np.tanh(raw[2])
                n = f * n + i
                m = m_new
                h = sigmoid(raw[3]) * c / n
                out[b, t, hd] = h
    return out


def s4d_convolution(u, log_a_bar, b_bar, c, segments):
    """y_t = sum_{s<=t, same document} K_{t-s} u_s, K_j = 2 Re(sum_n C_n B_bar_n A_bar_n^j) (explicit powers)."""
    u = np.asarray(u, np.float64)
    a_bar = np.exp(np.asarray(log_a_bar, np.complex128))
    cb = np.asarray(c, np.complex128) * np.asarray(b_bar, np.complex128)
    batch, length, channels = u.shape
    kernel = np.stack([2 * np.real(np.sum(cb * a_bar**j, axis=-1)) for j in range(length)])  # [T, H]
    out = np.zeros_like(u)
    for b in range(batch):
        for t in range(length):
            s = t
            while s >= 0 and segments[b, s] == segments[b, t]:
                out[b, t] += kernel[t - s] * u[b, s]
                s -= 1
    return out
