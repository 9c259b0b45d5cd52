// One decode step (one new token per row) of a Llama-family model in float32 on the CPU.
//
// Plain C ABI, no torch headers: compiled in seconds and loaded with ctypes. Python owns every
// buffer (weights, KV cache, scratch) and passes raw pointers once, in NbModel. Dense linears run
// here (AVX2/FMA when available, split across a work-stealing pool); any other linear is a format's
// C kernel (prepare/compute, see NbLinear) or a callback into Python.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "work_pool.h"
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

extern "C" {

// A non-dense linear (quantized format, Python callback). Per call, `prepare` (optional) runs first,
// as `prepare_parts` concurrent calls (part = 0 .. parts-1, each doing its share of the workspace),
// then `compute` fills y[r, o] for r < rows and out_begin <= o < out_end; compute runs
// concurrently on disjoint output ranges of `chunk` rows. Strides are in floats.
typedef void (*nb_prepare_fn)(void* ctx, const float* x, int64_t x_stride, int64_t rows, float* workspace,
                              int64_t part, int64_t parts);
typedef void (*nb_compute_fn)(void* ctx, const float* x, int64_t x_stride, const float* workspace, float* y,
                              int64_t y_stride, int64_t rows, int64_t out_begin, int64_t out_end);
// Or split by inputs: part `part` of `parts` writes its share of the sum over input features, for
// every output, to y (stride y_stride); the parts run concurrently and the step adds them up.
typedef void (*nb_split_fn)(void* ctx, const float* x, int64_t x_stride, int64_t rows, float* y, int64_t y_stride,
                            int64_t part, int64_t parts);

struct NbLinear {
    int64_t in_features, out_features;
    const float* weight;    // [out, in] row-major: dense; null: prepare/compute below
    const float* bias;      // [out] or null (dense only)
    nb_prepare_fn prepare;  // may be null
    nb_compute_fn compute;
    void* ctx;
    float* workspace;  // for prepare/compute, owned by Python
    int64_t chunk;     // output rows per task
    int64_t prepare_parts;  // concurrent prepare calls (at least 1)
    nb_split_fn split;      // non-null: used instead of prepare/compute
    int64_t split_parts;    // at most this many parts
    float* partials;        // split_parts * batch * out_features floats, owned by Python
};

struct NbLayer {
    const float* input_norm;
    const float* post_norm;
    NbLinear qkv[3];  // one fused linear (n_qkv == 1) or q, k, v
    int64_t n_qkv;
    NbLinear o_proj;
    NbLinear gate_up[2];  // one fused linear (n_gate_up == 1) or gate, up
    int64_t n_gate_up;
    NbLinear down;
};

struct NbModel {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, vocab, max_len, batch;
    int64_t threads;
    double eps, scale;
    const float* embed;       // [vocab, hidden]
    const float* final_norm;  // [hidden]
    const float* rope_cos;    // [max_len, head_dim]
    const float* rope_sin;    // [max_len, head_dim], first half negated
    float* cache;             // [layers, 2, batch, kv_heads, max_len, head_dim]
    NbLayer* layers;
    NbLinear lm_head;
    // scratch, all [batch, ...]
    float* x;       // hidden
    float* h;       // normalized hidden
    float* qkv;     // (heads + 2 kv_heads) * head_dim
    float* attn;    // heads * head_dim
    float* mlp;     // 2 * intermediate (gate, then up)
    float* scores;  // heads * max_len
    float* logits;  // vocab
};

// Exact greedy picks without reading the whole float head: `approx` is the head rounded to
// integers (a scalar kernel), whose logits differ from the float ones by at most
//   eps[o] = weight_error[o] * |h|_1 + code_sum[o] * max|h| / 16382 + 1e-4 * magnitude[o] * |h|_1
// (the weights' rounding, the kernel's rounding of h to 14-bit integers, and float rounding in both
// computations, generously; see nibble/runtime/screen.py). Only rows whose interval reaches the
// best lower bound can hold the float argmax; their float logits are computed exactly as the full
// head computes them.
struct NbScreen {
    NbLinear approx;
    const float* weight_error;  // [vocab] max |w - w_rounded| of each row
    const float* code_sum;      // [vocab] sum of scale * code of each row: the coefficients on rounded h
    const float* magnitude;     // [vocab] bound on the size of the terms each row's logit sums, per |h|_1
    int64_t max_candidates;     // more than this: compute the whole float head for that row
    int64_t* candidates;        // [max_candidates] scratch
};

}  // extern "C"

namespace {

float dot(const float* a, const float* b, int64_t n) {
    int64_t i = 0;
    float total = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    __m256 acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_shuffle_ps(half, half, 1));
    total = _mm_cvtss_f32(half);
#endif
    for (; i < n; ++i) total += a[i] * b[i];
    return total;
}

// The first index of the largest of x[0..n-1] (n >= 1), or of the first NaN: a vectorised pass for
// the maximum, then a scan for its first occurrence.
int64_t argmax(const float* x, int64_t n) {
    float best = x[0];
    bool nan = false;
    int64_t i = 0;
#if defined(__AVX2__)
    if (n >= 8) {
        __m256 top = _mm256_loadu_ps(x), unordered = _mm256_cmp_ps(top, top, _CMP_UNORD_Q);
        for (i = 8; i + 8 <= n; i += 8) {
            const __m256 v = _mm256_loadu_ps(x + i);
            top = _mm256_max_ps(top, v);
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, top);
        best = lanes[0];
        for (float lane : lanes) best = lane > best ? lane : best;
        nan = _mm256_movemask_ps(unordered) != 0;
    }
#endif
    for (; i < n; ++i) {
        nan = nan || x[i] != x[i];
        best = x[i] > best ? x[i] : best;
    }
    for (int64_t j = 0; j < n; ++j)
        if (nan ? x[j] != x[j] : x[j] == best) return j;
    return 0;
}

constexpr int64_t kRowsPerChunk = 32;
constexpr int64_t kAttentionWorkPerJob = 256;  // (head, key) pairs worth a pool job (~1 us to hand out)

// Output o of a dense linear for one input row: every float logit of the head, screened or not, is
// computed here, so the screen's picks equal the full head's bit for bit.
inline float dense_output(const NbLinear& lin, const float* x, int64_t o) {
    return dot(lin.weight + o * lin.in_features, x, lin.in_features) + (lin.bias ? lin.bias[o] : 0.0f);
}

// y = x W^T + b for `rows` input rows; each weight row is read once for all input rows.
void dense_linear(const NbLinear& lin, const float* x, int64_t x_stride, float* y, int64_t y_stride,
                  int64_t rows, nibble::WorkPool& pool) {
    const int64_t out = lin.out_features;
    const int64_t chunks = (out + kRowsPerChunk - 1) / kRowsPerChunk;
    pool.run(chunks, [&](int64_t chunk) {
        const int64_t end = std::min(out, (chunk + 1) * kRowsPerChunk);
        for (int64_t o = chunk * kRowsPerChunk; o < end; ++o)
            for (int64_t r = 0; r < rows; ++r) y[r * y_stride + o] = dense_output(lin, x + r * x_stride, o);
    });
}

nibble::WorkPool& pool_for(int64_t threads) {
    static nibble::WorkPool pool;
    pool.resize(threads);
    return pool;
}

int64_t split_parts(const NbModel& m, const NbLinear& lin) {
    return std::max<int64_t>(1, std::min(lin.split_parts, m.threads));
}

// y = the sum of `lin`'s parts, each in its own slice of lin.partials.
void add_up_parts(const NbModel& m, const NbLinear& lin, int64_t parts, float* y, int64_t y_stride) {
    const int64_t out = lin.out_features, slice = m.batch * out;
    for (int64_t r = 0; r < m.batch; ++r) {
        float* yr = y + r * y_stride;
        const float* first = lin.partials + r * out;
        std::memcpy(yr, first, out * sizeof(float));
        for (int64_t part = 1; part < parts; ++part)
            for (int64_t o = 0; o < out; ++o) yr[o] += first[part * slice + o];
    }
}

// Split-by-inputs linears that read the same x (q, k and v; gate and up) in one pool job: one part
// per thread of each, so the threads meet once per group instead of once per linear. With one
// part a linear writes y directly.
void run_split_group(const NbModel& m, const NbLinear* group, int64_t count, const float* x, int64_t x_stride,
                     float* y, int64_t y_stride, nibble::WorkPool& pool) {
    int64_t first_task[4] = {0, 0, 0, 0}, offsets[4] = {0, 0, 0, 0}, tasks = 0, offset = 0;
    for (int64_t i = 0; i < count; ++i) {
        first_task[i] = tasks, offsets[i] = offset;
        tasks += split_parts(m, group[i]);
        offset += group[i].out_features;
    }
    pool.run(tasks, [&](int64_t task) {
        int64_t i = count - 1;
        while (first_task[i] > task) --i;
        const NbLinear& lin = group[i];
        const int64_t part = task - first_task[i], parts = split_parts(m, lin);
        if (parts == 1)
            lin.split(lin.ctx, x, x_stride, m.batch, y + offsets[i], y_stride, 0, 1);
        else
            lin.split(lin.ctx, x, x_stride, m.batch, lin.partials + part * m.batch * lin.out_features,
                      lin.out_features, part, parts);
    });
    for (int64_t i = 0; i < count; ++i) {
        const int64_t parts = split_parts(m, group[i]);
        if (parts > 1) add_up_parts(m, group[i], parts, y + offsets[i], y_stride);
    }
}

void run_linear(const NbModel& m, const NbLinear& lin, const float* x, int64_t x_stride, float* y,
                int64_t y_stride) {
    if (lin.weight) {
        dense_linear(lin, x, x_stride, y, y_stride, m.batch, pool_for(m.threads));
        return;
    }
    nibble::WorkPool& pool = pool_for(m.threads);
    if (lin.split) {
        run_split_group(m, &lin, 1, x, x_stride, y, y_stride, pool);
        return;
    }
    const int64_t parts = std::max<int64_t>(lin.prepare_parts, 1);
    if (lin.prepare && parts == 1) lin.prepare(lin.ctx, x, x_stride, m.batch, lin.workspace, 0, 1);
    if (lin.prepare && parts > 1)
        pool.run(parts, [&](int64_t part) { lin.prepare(lin.ctx, x, x_stride, m.batch, lin.workspace, part, parts); });
    const int64_t out = lin.out_features, chunk = std::max<int64_t>(lin.chunk, 1);
    pool.run((out + chunk - 1) / chunk, [&](int64_t task) {
        lin.compute(lin.ctx, x, x_stride, lin.workspace, y, y_stride, m.batch, task * chunk,
                    std::min(out, (task + 1) * chunk));
    });
}

#if defined(__AVX2__) && defined(__FMA__)
// e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, a degree-7 polynomial for e^r (the Cephes
// expf coefficients, relative error ~1e-7), times 2^n built in the exponent bits. x is clamped to
// [-87, 88], where 2^n stays a normal float.
__m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: n ln2 exact
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    const __m256 er = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(er, _mm256_castsi256_ps(bits));
}
#endif

// gate <- silu(gate) * up = gate / (1 + e^-gate) * up, over n values.
void silu_times(float* gate, const float* up, int64_t n) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 sigmoid_inv = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_div_ps(g, sigmoid_inv), _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void rms_norm(const float* x, const float* weight, float* out, int64_t n, double eps) {
    float squares = 0.0f;
    for (int64_t i = 0; i < n; ++i) squares += x[i] * x[i];
    const float inv = 1.0f / std::sqrt(squares / static_cast<float>(n) + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inv);
}

// x <- x * cos + rotate_half(x) * sin, with sin's first half pre-negated.
void rope(float* x, const float* cos, const float* sin, int64_t dim) {
    const int64_t half = dim / 2;
    float rotated[512];
    for (int64_t i = 0; i < dim; ++i) rotated[i] = x[(i + half) % dim];
    for (int64_t i = 0; i < dim; ++i) x[i] = x[i] * cos[i] + rotated[i] * sin[i];
}

float* cache_at(const NbModel& m, int64_t layer, int64_t kind, int64_t row, int64_t kv_head, int64_t slot) {
    const int64_t per_head = m.max_len * m.head_dim;
    const int64_t index = (((layer * 2 + kind) * m.batch + row) * m.num_kv_heads + kv_head) * per_head;
    return m.cache + index + slot * m.head_dim;
}

// Rotate q and k of every row, then store k and v at `slot` of the cache.
void rope_and_store(const NbModel& m, int64_t layer, const int64_t* positions, int64_t slot) {
    const int64_t qkv_width = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim;
    for (int64_t r = 0; r < m.batch; ++r) {
        float* row = m.qkv + r * qkv_width;
        const float* cos = m.rope_cos + positions[r] * m.head_dim;
        const float* sin = m.rope_sin + positions[r] * m.head_dim;
        for (int64_t h = 0; h < m.num_heads + m.num_kv_heads; ++h) rope(row + h * m.head_dim, cos, sin, m.head_dim);
        for (int64_t g = 0; g < m.num_kv_heads; ++g) {
            const float* k = row + (m.num_heads + g) * m.head_dim;
            const float* v = row + (m.num_heads + m.num_kv_heads + g) * m.head_dim;
            std::memcpy(cache_at(m, layer, 0, r, g, slot), k, m.head_dim * sizeof(float));
            std::memcpy(cache_at(m, layer, 1, r, g, slot), v, m.head_dim * sizeof(float));
        }
    }
}

// Softmax attention of each row's query heads over cache slots pads[r] .. length-1.
void attention(const NbModel& m, int64_t layer, const int64_t* pads, int64_t length) {
    const int64_t qkv_width = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim;
    const int64_t group = m.num_heads / m.num_kv_heads;
    const int64_t tasks = m.batch * m.num_heads;
    auto one_head = [&](int64_t task) {
        const int64_t r = task / m.num_heads, h = task % m.num_heads, g = h / group;
        const float* q = m.qkv + r * qkv_width + h * m.head_dim;
        const float* keys = cache_at(m, layer, 0, r, g, 0);
        const float* values = cache_at(m, layer, 1, r, g, 0);
        float* scores = m.scores + task * m.max_len;
        float* out = m.attn + r * m.num_heads * m.head_dim + h * m.head_dim;
        const int64_t first = pads[r] < length - 1 ? pads[r] : length - 1;
        float best = -INFINITY;
        for (int64_t s = first; s < length; ++s) {
            scores[s] = dot(q, keys + s * m.head_dim, m.head_dim) * static_cast<float>(m.scale);
            best = scores[s] > best ? scores[s] : best;
        }
        float total = 0.0f;
        for (int64_t s = first; s < length; ++s) total += (scores[s] = std::exp(scores[s] - best));
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < m.head_dim; ++d) out[d] = 0.0f;
        for (int64_t s = first; s < length; ++s) {
            const float p = scores[s] * inv;
            const float* v = values + s * m.head_dim;
            for (int64_t d = 0; d < m.head_dim; ++d) out[d] += p * v[d];
        }
    };
    if (m.threads > 1 && length * tasks >= kAttentionWorkPerJob) {
        pool_for(m.threads).run(tasks, one_head);
    } else {
        for (int64_t task = 0; task < tasks; ++task) one_head(task);
    }
}

void normalize_rows(const NbModel& m, const float* weight) {
    for (int64_t r = 0; r < m.batch; ++r) rms_norm(m.x + r * m.hidden, weight, m.h + r * m.hidden, m.hidden, m.eps);
}

// Run a group of linears (one fused, or several side by side) from h into `out` (row width `width`).
void run_group(const NbModel& m, const NbLinear* group, int64_t count, float* out, int64_t width) {
    if (std::all_of(group, group + count, [](const NbLinear& lin) { return lin.split != nullptr; })) {
        run_split_group(m, group, count, m.h, m.hidden, out, width, pool_for(m.threads));
        return;
    }
    int64_t offset = 0;
    for (int64_t i = 0; i < count; ++i) {
        run_linear(m, group[i], m.h, m.hidden, out + offset, width);
        offset += group[i].out_features;
    }
}

void attention_block(const NbModel& m, int64_t index, const int64_t* positions, const int64_t* pads,
                     int64_t slot) {
    const NbLayer& layer = m.layers[index];
    const int64_t qkv_width = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim;
    const int64_t attn_width = m.num_heads * m.head_dim;
    normalize_rows(m, layer.input_norm);
    run_group(m, layer.qkv, layer.n_qkv, m.qkv, qkv_width);
    rope_and_store(m, index, positions, slot);
    attention(m, index, pads, slot + 1);
    run_linear(m, layer.o_proj, m.attn, attn_width, m.h, m.hidden);
    for (int64_t i = 0; i < m.batch * m.hidden; ++i) m.x[i] += m.h[i];
}

void mlp_block(const NbModel& m, int64_t index) {
    const NbLayer& layer = m.layers[index];
    const int64_t width = 2 * m.intermediate;
    normalize_rows(m, layer.post_norm);
    run_group(m, layer.gate_up, layer.n_gate_up, m.mlp, width);
    for (int64_t r = 0; r < m.batch; ++r) {
        float* gate = m.mlp + r * width;
        const float* up = gate + m.intermediate;
        silu_times(gate, up, m.intermediate);
    }
    run_linear(m, layer.down, m.mlp, width, m.h, m.hidden);
    for (int64_t i = 0; i < m.batch * m.hidden; ++i) m.x[i] += m.h[i];
}

std::mutex one_at_a_time;  // the pool is shared: concurrent Python threads take turns

// Every layer and the final norm for one token per row (see nb_llama_decode); leaves h.
int64_t decode_body(const NbModel& m, const int64_t* tokens, const int64_t* positions, const int64_t* pads,
                    int64_t slot) {
    if (slot < 0 || slot >= m.max_len || m.head_dim > 512) return -1;
    std::vector<int64_t> derived;
    if (!positions) {
        for (int64_t r = 0; r < m.batch; ++r) derived.push_back(std::max<int64_t>(slot - pads[r], 0));
        positions = derived.data();
    }
    if (tokens) {
        for (int64_t r = 0; r < m.batch; ++r) {
            if (tokens[r] < 0 || tokens[r] >= m.vocab) return -2;
            std::memcpy(m.x + r * m.hidden, m.embed + tokens[r] * m.hidden, m.hidden * sizeof(float));
        }
    }
    for (int64_t index = 0; index < m.num_layers; ++index) {
        attention_block(m, index, positions, pads, slot);
        mlp_block(m, index);
    }
    normalize_rows(m, m.final_norm);
    return 0;
}

// The float argmax of row r's logits, screened through the rounded head whose logits are in
// m.logits (see NbScreen); -1 when the screen cannot decide (too many candidates, non-finite values).
int64_t screened_pick(const NbModel& m, const NbScreen& screen, int64_t r) {
    const float* h = m.h + r * m.hidden;
    const float* approx = m.logits + r * m.vocab;
    float l1 = 0.f, amax = 0.f;
    for (int64_t i = 0; i < m.hidden; ++i) l1 += std::fabs(h[i]), amax = std::max(amax, std::fabs(h[i]));
    const float x_error = amax / 16382.f;
    const auto eps = [&](int64_t o) {
        return screen.weight_error[o] * l1 + screen.code_sum[o] * x_error + 1e-4f * screen.magnitude[o] * l1;
    };
    float floor = -INFINITY;  // the best lower bound
    for (int64_t o = 0; o < m.vocab; ++o) floor = std::max(floor, approx[o] - eps(o));
    if (!std::isfinite(floor)) return -1;
    int64_t count = 0;
    for (int64_t o = 0; o < m.vocab; ++o) {
        if (approx[o] + eps(o) < floor) continue;
        if (count == screen.max_candidates) return -1;
        screen.candidates[count++] = o;
    }
    int64_t best = -1;
    float best_value = -INFINITY;
    for (int64_t c = 0; c < count; ++c) {  // ascending rows: the first of equal maxima wins, as in argmax
        const int64_t o = screen.candidates[c];
        const float value = dense_output(m.lm_head, h, o);
        if (value != value) return -1;
        if (best < 0 || value > best_value) best = o, best_value = value;
    }
    return best;
}

}  // namespace

extern "C" {

int64_t nb_abi_version() { return 6; }

// Embed `tokens` (or use m.x as given when tokens is null), run every layer for one position per row,
// write k/v at cache `slot`, and leave logits [batch, vocab] in m.logits. Row r attends to slots
// pads[r] .. slot; its RoPE position is positions[r], or slot - pads[r] when positions is null.
int64_t nb_llama_decode(const NbModel* model, const int64_t* tokens, const int64_t* positions,
                        const int64_t* pads, int64_t slot) {
    std::lock_guard<std::mutex> lock(one_at_a_time);
    const NbModel& m = *model;
    const int64_t status = decode_body(m, tokens, positions, pads, slot);
    if (status != 0) return status;
    run_linear(m, m.lm_head, m.h, m.hidden, m.logits, m.vocab);
    return 0;
}

// nb_llama_decode for greedy decoding with a float head (m.lm_head dense): picks[r] is the first
// index of the largest float logit of row r, as nb_argmax_rows would find in nb_llama_decode's
// logits, found through `screen` (the full float head only for rows the screen cannot decide).
// m.logits is left holding the rounded head's logits (or the float ones for such rows).
int64_t nb_llama_decode_greedy(const NbModel* model, const NbScreen* screen, const int64_t* tokens,
                               const int64_t* positions, const int64_t* pads, int64_t slot, int64_t* picks) {
    std::lock_guard<std::mutex> lock(one_at_a_time);
    const NbModel& m = *model;
    if (!m.lm_head.weight) return -3;
    const int64_t status = decode_body(m, tokens, positions, pads, slot);
    if (status != 0) return status;
    run_linear(m, screen->approx, m.h, m.hidden, m.logits, m.vocab);
    for (int64_t r = 0; r < m.batch; ++r) {
        picks[r] = screened_pick(m, *screen, r);
        if (picks[r] >= 0) continue;
        float* logits = m.logits + r * m.vocab;
        dense_linear(m.lm_head, m.h + r * m.hidden, m.hidden, logits, m.vocab, 1, pool_for(m.threads));
        picks[r] = argmax(logits, m.vocab);
    }
    return 0;
}

// gate[i] <- silu(gate[i]) * up[i] for i < n: the MLP's activation as the step computes it.
void nb_silu_times(float* gate, const float* up, int64_t n) { silu_times(gate, up, n); }

// Greedy pick: out[r] = the first index of the largest of x[r, 0..cols-1] (the first NaN if there is
// one, as torch.argmax does).
void nb_argmax_rows(const float* x, int64_t rows, int64_t cols, int64_t* out) {
    for (int64_t r = 0; r < rows; ++r) out[r] = argmax(x + r * cols, cols);
}

}  // extern "C"
