/* One token per row of a batch of logits, in one pass over each row: chatstream's sampler
 * (engine/core/sampler.py) without PyTorch's operators. Built and cached like kernels.c by
 * chatstream.engine.ops.native.build, loaded by chatstream.engine.core.sampling_native.
 *
 * Through PyTorch, a 16 x 49,152 step spent more on torch.topk, argmax and the divisions and
 * reductions around them (each its own pass over the batch) than a whole greedy decode's
 * non-matmul work. Here a row is read once: the largest `count` logits are kept in a min-heap while
 * blocks of 64 whose maximum cannot enter it are skipped in one vector compare, so top-k costs
 * about what argmax does. The arithmetic after the selection follows sampler.py step by step
 * (top-k, then top-p over the probabilities after top-k, then min-p, then a draw by inverting the
 * CDF in token-id order, cumulative sums in double as PyTorch's CPU cumsum does), so the same
 * seed draws the same token as the PyTorch path wherever the distribution is the same.
 *
 * A row the selection cannot settle exactly returns -1 and sampler.py redoes it over the whole
 * vocabulary: a top-k larger than `candidates`, or a top-p/min-p nucleus that reaches past them.
 *
 * A grammar's mask (llguidance's packed bitmask, one bit per token) is applied here too, on a copy
 * of each constrained row, so a constrained row costs one more pass over its row instead of
 * PyTorch's unpack, masked_fill and the gather/scatter of the constrained rows around them. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../ops/vector_math.h"

typedef struct {
    float value;
    int64_t id;
} candidate;

/* "a is worse than b": smaller, or equal with the larger id (the earlier id wins a tie, as the
 * first occurrence does in argmax). */
static inline int worse(candidate a, candidate b) { return a.value < b.value || (a.value == b.value && a.id > b.id); }

static void sift_down(candidate *heap, int64_t n, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && worse(heap[l], heap[m])) m = l;
        if (r < n && worse(heap[r], heap[m])) m = r;
        if (m == i) return;
        candidate t = heap[i];
        heap[i] = heap[m];
        heap[m] = t;
        i = m;
    }
}

static float block_max(const float *x, int64_t n) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* The maximum of a block of BLOCK floats: vertical maxima, then one horizontal reduction (a
 * constant trip count unrolls). */
#define BLOCK 64
static inline float block_max_full(const float *x) {
    float m = x[0];
#pragma omp simd reduction(max : m)
    for (int i = 1; i < BLOCK; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* The `count` largest entries of x (count <= n) into out, largest first. */
static void select_largest(const float *x, int64_t n, int64_t count, candidate *out) {
    for (int64_t i = 0; i < count; i++) out[i] = (candidate){x[i], i};
    for (int64_t i = count / 2 - 1; i >= 0; i--) sift_down(out, count, i);
    for (int64_t i = count; i < n; i += BLOCK) {
        int64_t end = i + BLOCK <= n ? i + BLOCK : n;
        if ((end - i == BLOCK ? block_max_full(x + i) : block_max(x + i, end - i)) >= out[0].value) /* one may enter */
            for (int64_t j = i; j < end; j++)
                if (x[j] > out[0].value) {
                    out[0] = (candidate){x[j], j};
                    sift_down(out, count, 0);
                }
    }
    /* Heap -> sorted, largest first: pop the smallest to the back. */
    for (int64_t k = count - 1; k > 0; k--) {
        candidate t = out[0];
        out[0] = out[k];
        out[k] = t;
        sift_down(out, k, 0);
    }
}

static int64_t argmax(const float *x, int64_t n) {
    float best = x[0];
    int64_t at = 0;
    for (int64_t i = 0; i < n; i += BLOCK) {
        int64_t end = i + BLOCK <= n ? i + BLOCK : n;
        if ((end - i == BLOCK ? block_max_full(x + i) : block_max(x + i, end - i)) > best)
            for (int64_t j = i; j < end; j++)
                if (x[j] > best) {
                    best = x[j];
                    at = j;
                }
    }
    return at;
}

static int by_id(const void *a, const void *b) {
    int64_t x = ((const candidate *)a)->id, y = ((const candidate *)b)->id;
    return (x > y) - (x < y);
}

/* The first index whose running (double) sum, rounded to float, reaches u times the total:
 * PyTorch's searchsorted(cumsum(probs), u * cdf[-1]). probs[i] == 0 entries are never chosen. */
static int64_t draw(const float *probs, int64_t n, float u) {
    double acc = 0;
    for (int64_t i = 0; i < n; i++) acc += probs[i];
    const float target = u * (float)acc;
    int64_t last = 0;
    acc = 0;
    for (int64_t i = 0; i < n; i++) {
        if (probs[i] == 0.f) continue;
        acc += probs[i];
        last = i;
        if ((float)acc >= target) return i;
    }
    return last;
}

/* softmax(values) in place over n entries, -INFINITY ones staying 0. */
static void softmax(float *values, int64_t n) {
    float m = block_max(values, n);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) {
        values[i] = values[i] == -INFINITY ? 0.f : exp_approx(values[i] - m);
        sum += values[i];
    }
#pragma omp simd
    for (int64_t i = 0; i < n; i++) values[i] /= sum;
}

static uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* sampler.py's _uniform: a float in (0, 1) from (seed, step), splitmix64, bit for bit. */
float uniform(int64_t seed, int64_t step) {
    const uint64_t golden = 0x9E3779B97F4A7C15ull;
    uint64_t z = mix(mix((uint64_t)seed * golden + golden) + (uint64_t)step * golden);
    return ((float)(z >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

/* Row r of logits (rows of `vocab`, `stride` apart): temperature[r] <= 0 -> argmax; else scaled by
 * 1 / temperature and truncated by top_k (0 = off; callers pass 0 for one >= vocab), top_p (1 =
 * off) and min_p (0 = off; min_p may be NULL), then drawn at uniform(seed[r], step[r]).
 * work: `vocab` floats. Returns the token, or -1 when the row must be redone over the vocabulary. */
static int64_t sample_row(const float *x, int64_t vocab, float temperature, int64_t top_k, float top_p, float min_p,
                          float u, int64_t candidates, float *work, candidate *cand) {
    if (!(temperature > 0.f)) return argmax(x, vocab);
    if (top_k == 0 && !(top_p < 1.f) && !(min_p > 0.f)) { /* temperature only: the whole vocabulary */
#pragma omp simd
        for (int64_t i = 0; i < vocab; i++) work[i] = x[i] / temperature;
        softmax(work, vocab);
        return draw(work, vocab, u);
    }
    if (top_k > candidates) return -1;
    int64_t count = top_k > 0 ? top_k : candidates;
    if (count > vocab) count = vocab;
    /* Dividing by a positive temperature keeps the order: select on the raw logits. */
    select_largest(x, vocab, count, cand);
    for (int64_t j = 0; j < count; j++) cand[j].value /= temperature;
    /* top-p's probabilities are those after top-k: over the top-k when there is one, else the vocabulary. */
    const float top = cand[0].value;
    float sum = 0.f;
    if (top_k > 0)
        for (int64_t j = 0; j < count; j++) sum += expf(cand[j].value - top);
    else
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < vocab; i++) sum += exp_approx(x[i] / temperature - top);
    const float total = top + logf(sum);
    /* Drop a token once the tokens before it already cover top_p (the first always stays), and
     * those below min_p times the most likely. */
    const float floor = min_p * expf(top - total);
    double acc = 0;
    int64_t kept = 0;
    int drop = 0;
    for (int64_t j = 0; j < count; j++) {
        const float p = expf(cand[j].value - total);
        acc += p;
        drop = (top_p < 1.f && (float)acc - p > top_p) || p < floor;
        if (!drop) cand[kept++] = cand[j];
    }
    if (top_k == 0 && !drop && count < vocab) return -1; /* the nucleus may run past the candidates */
    /* Draw in token-id order over the kept tokens, renormalised. */
    qsort(cand, (size_t)kept, sizeof *cand, by_id);
    for (int64_t j = 0; j < kept; j++) work[j] = cand[j].value;
    softmax(work, kept);
    return cand[draw(work, kept, u)].id;
}

/* Grows a per-thread buffer (lanes may sample at once): a fresh malloc of a vocabulary's floats
 * per call is an mmap, and its first touch page faults, each step. Every buffer is 64-byte
 * aligned, so a vectorised sum over it adds in the same order in every thread (no alignment
 * peeling that differs): a row's token never depends on which lane drew it. */
static void *scratch(void **buffer, size_t *capacity, size_t bytes) {
    if (bytes > *capacity) {
        free(*buffer);
        bytes = (bytes + 63) / 64 * 64;
        *buffer = aligned_alloc(64, bytes);
        *capacity = *buffer ? bytes : 0;
    }
    return *buffer;
}

/* Whether a row's mask (`words` int32, bit i % 32 of word i / 32 set = token i allowed) allows
 * every token of the vocabulary: a free row in a batch that holds constrained ones. */
static int allows_all(const int32_t *bits, int64_t words, int64_t vocab) {
    if (words * 32 < vocab) return 0;
    for (int64_t w = 0; w < words; w++)
        if (bits[w] != -1) return 0;
    return 1;
}

/* out = x with the tokens `bits` forbids (and any past its words) at -inf, as sampler.py's mask. A
 * grammar's words are mostly all allowed (inside a string) or all forbidden (between values):
 * those are one copy or fill of 32 floats each. */
static void apply_mask(const float *x, int64_t vocab, const int32_t *bits, int64_t words, float *out) {
    for (int64_t w = 0; w < words && w * 32 < vocab; w++) {
        const int64_t start = w * 32, n = vocab - start < 32 ? vocab - start : 32;
        const uint32_t word = (uint32_t)bits[w];
        if (word == 0xFFFFFFFFu && n == 32)
            memcpy(out + start, x + start, 32 * sizeof(float));
        else
#pragma omp simd
            for (int64_t j = 0; j < n; j++) out[start + j] = (word >> j) & 1u ? x[start + j] : -INFINITY;
    }
    for (int64_t i = words * 32; i < vocab; i++) out[i] = -INFINITY;
}

/* The whole batch; see sample_row. With `allowed` (NULL: none), row r keeps only the tokens its
 * mask allowed + r * words allows (sampler.py's mask, packed). With `penalty` (per row; NULL: none),
 * row r's tokens seen_tokens[seen_starts[r] .. seen_starts[r + 1]) get transformers' repetition
 * penalty, after the mask, on a copy of the row: a seen logit is divided by the penalty if positive,
 * else multiplied (computed from the row's own value, so a token seen twice is penalised once, as
 * sampler.py does; a masked token stays -inf). The caller's logits are never written.
 * Returns 0, or -1 when memory for the work buffers ran out. */
int sample_rows(const float *logits, int64_t rows, int64_t vocab, int64_t stride, const float *temperature,
                const int64_t *top_k, const float *top_p, const float *min_p, const int64_t *seed,
                const int64_t *step, int64_t candidates, const float *penalty, const int64_t *seen_starts,
                const int64_t *seen_tokens, const int32_t *allowed, int64_t words, int64_t *out) {
    static __thread void *work_buffer, *cand_buffer, *row_buffer;
    static __thread size_t work_capacity, cand_capacity, row_capacity;
    float *work = scratch(&work_buffer, &work_capacity, (size_t)vocab * sizeof(float));
    candidate *cand = scratch(&cand_buffer, &cand_capacity,
                              (size_t)(candidates < vocab ? candidates : vocab) * sizeof(candidate));
    float *copy = penalty || allowed ? scratch(&row_buffer, &row_capacity, (size_t)vocab * sizeof(float)) : NULL;
    if (work == NULL || cand == NULL || ((penalty || allowed) && copy == NULL)) return -1;
    for (int64_t r = 0; r < rows; r++) {
        const float *x = logits + r * stride;
        const int masked = allowed && !allows_all(allowed + r * words, words, vocab);
        const int penalised = penalty && penalty[r] != 1.f && seen_starts[r + 1] > seen_starts[r];
        if (masked)
            apply_mask(x, vocab, allowed + r * words, words, copy);
        else if (penalised)
            memcpy(copy, x, (size_t)vocab * sizeof(float));
        if (penalised)
            for (int64_t j = seen_starts[r]; j < seen_starts[r + 1]; j++) {
                const int64_t t = seen_tokens[j];
                if (t >= 0 && t < vocab && copy[t] != -INFINITY)
                    copy[t] = x[t] > 0.f ? x[t] / penalty[r] : x[t] * penalty[r];
            }
        if (masked || penalised) x = copy;
        const int64_t k = top_k[r] > 0 && top_k[r] < vocab ? top_k[r] : 0;
        out[r] = sample_row(x, vocab, temperature[r], k, top_p[r], min_p ? min_p[r] : 0.f, uniform(seed[r], step[r]),
                            candidates, work, cand);
    }
    return 0;
}
