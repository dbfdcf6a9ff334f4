/* C kernels for CPU decode steps, where the bytes read and the number of ops, not arithmetic, set
 * the pace.
 *
 * nf4_linear:   y[t, o] = sum_k x[t, k] * W[o, k],  W[o, k] = code[q(o, k)] * absmax[o, k / blocksize]
 *               read straight from 4-bit codes (server/kernels/cpu_kernels.py repacks bitsandbytes'
 *               layout once at load: in each chunk of 32 weights of a row, byte j holds weight j in
 *               its low nibble and weight j + 16 in its high one). Each weight is formed exactly as
 *               bitsandbytes dequantizes it (one float32 multiply), then multiplied into the sum.
 * nf4_dequantize: W itself in float32 (each weight code[q] * absmax, bitsandbytes' own product), for
 *               prefills: many tokens per row are compute-bound, and a dense GEMM on W beats forming
 *               every weight again for each tile of tokens.
 * dense_linear: y[t, o] = sum_k x[t, k] * W[o, k] on float32 or bfloat16 W (the LM head; a bfloat16
 *               weight is widened exactly to float32 as it is read, so it is the same arithmetic on half
 *               the bytes).
 * lora_add:     multi-LoRA, one adapter slot per token, each slot's weights read once for its tokens.
 * decode_attention: each row's one new query token attends to its first lengths[b] positions in
 *               the paged KV cache, read in place through its block table (server/model/kv_cache.py's
 *               layout), with an online softmax; query head h reads kv head h / (heads / kv_heads).
 *
 * All accumulate in float32 in their own order, which is the only difference from torch's linear
 * on the dequantized weight (whose own order changes with the batch size). Tokens go through in
 * tiles of up to TILE, so a decode step reads each weight once; rows of W are split between the
 * threads of a small pool of our own (below), not OpenMP: the engine calls from its own thread,
 * and libgomp, once the main thread also has a team, counts more threads than CPUs and puts its
 * workers to sleep between regions, which cost more than the work at one token per row (measured:
 * 2-3x per decode step).
 * An AVX-512 version and a portable one are compiled side by side; `*_auto` picks at run time.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 8
/* Weights this far ahead are asked for: a projection's rows (and the LM head's) are one contiguous
 * stream per thread, but the hardware prefetchers stop at every 4 KiB page, and at a few tokens the
 * loads of the weights stalled the loops (a third of their cycles on the first one). A page or two
 * ahead measured best: the one-token LM head in bf16 2.9 ms with 8 KiB, 3.5 ms without. */
#define PREFETCH_BYTES 4096
#define DENSE_PREFETCH_BYTES 8192
#define ROWS_PER_TASK 16

/* Left out with -DHOTLORA_NO_AVX512 / -DHOTLORA_NO_AVX2: where torch's CPU capability is capped below them. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(HOTLORA_NO_AVX512)
#define HAVE_AVX512_VERSION 1
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(HOTLORA_NO_AVX2)
#define HAVE_AVX2_VERSION 1
#endif

/* ---- the thread pool: parallel_for splits [0, total) in `threads` contiguous parts; the caller
 * runs part 0, workers the others. From the start of decode_layers, whose regions follow each other
 * within microseconds, to the end of the next job after it (a decode step's LM head), workers spin
 * a short while for the next job, then sleep on a condition variable. After any other job (a
 * kernel called from Python) they sleep at once: what runs next is torch's own threads or the
 * server's, and a worker spinning for 200 us took a core from them (an OpenMP GEMM after a
 * dequantize waited for it, and so did the gRPC and HTTP threads on 2 cores); a sleeping worker,
 * though, took longer to wake than the LM head's own work on a VM. ---- */
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

typedef void (*range_fn)(const void *args, int64_t begin, int64_t end);
#define MAX_WORKERS 63
#define SPIN_SECONDS 2e-4

static struct {
    pthread_mutex_t job_lock, sleep_lock;
    pthread_cond_t wake;
    int workers;
    atomic_ulong generation;
    atomic_int pending, sleepers, linger, in_layers;
    range_fn fn;
    const void *args;
    int64_t total;
    int parts;
    unsigned long first_generation[MAX_WORKERS + 1];  /* the job a worker starts after, set when it is created */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, {0}};

static atomic_int wide_in_use;  /* set when the AVX-512 or AVX2 versions are chosen (vector_version) */

/* After AVX-512 or AVX2 code, vzeroupper. Whatever the compiler emits, some of our AVX-512 functions
 * return with the upper halves of ymm/zmm0-15 dirty, and then every legacy-SSE instruction the
 * thread runs pays a merge penalty; the code between our jobs is SSE (the scalar loops, glibc's
 * expf). Measured on SmolLM2: a base-only decode step took 22 ms instead of 14, expf 20x slower per
 * call; with an adapter, the LoRA kernels happened to leave the registers clean, so base-only
 * batches decoded 2.5x slower than adapter ones. */
static inline void clean_upper_registers(void)
{
#if defined(HAVE_AVX512_VERSION) || defined(HAVE_AVX2_VERSION)
    if (atomic_load_explicit(&wide_in_use, memory_order_relaxed)) __asm__ volatile("vzeroupper" : : : "memory");
#endif
}

static void run_part(int part)
{
    int64_t begin = pool.total * part / pool.parts, end = pool.total * (part + 1) / pool.parts;
    if (begin < end) pool.fn(pool.args, begin, end);
    clean_upper_registers();
}

static double seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static inline void relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *worker_main(void *arg)
{
    const int part = (int)(intptr_t)arg;
    unsigned long seen = pool.first_generation[part];
    for (;;) {
        double give_up = 0.0;
        for (long spins = 1; atomic_load_explicit(&pool.generation, memory_order_acquire) == seen; spins++) {
            relax();
            if (spins % 256) continue;
            const int lingering = atomic_load_explicit(&pool.linger, memory_order_relaxed);
            if (lingering && give_up == 0.0) {
                give_up = seconds() + SPIN_SECONDS;
            } else if (!lingering || seconds() > give_up) {
                pthread_mutex_lock(&pool.sleep_lock);
                atomic_fetch_add(&pool.sleepers, 1);
                while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.sleep_lock);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.sleep_lock);
            }
        }
        seen = atomic_load_explicit(&pool.generation, memory_order_acquire);
        if (part < pool.parts) run_part(part);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return NULL;
}

static void forget_workers_after_fork(void) { pool.workers = 0; }

static void parallel_for(int64_t total, int threads, range_fn fn, const void *args)
{
    if (threads > MAX_WORKERS + 1) threads = MAX_WORKERS + 1;
    if (threads <= 1 || total <= 1) {
        fn(args, 0, total);
        clean_upper_registers();
        return;
    }
    pthread_mutex_lock(&pool.job_lock);
    if (pool.workers == 0) pthread_atfork(NULL, NULL, forget_workers_after_fork);
    while (pool.workers < threads - 1) {
        pthread_t thread;
        pool.first_generation[pool.workers + 1] = atomic_load(&pool.generation);
        if (pthread_create(&thread, NULL, worker_main, (void *)(intptr_t)(pool.workers + 1)) != 0) break;
        pthread_detach(thread);
        pool.workers++;
    }
    pool.fn = fn;
    pool.args = args;
    pool.total = total;
    pool.parts = pool.workers + 1 < threads ? pool.workers + 1 : threads;
    atomic_store(&pool.pending, pool.workers);
    atomic_fetch_add(&pool.generation, 1);  /* sequentially consistent with the sleepers count */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.sleep_lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
    run_part(0);
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) relax();
    if (!atomic_load_explicit(&pool.in_layers, memory_order_relaxed))
        atomic_store_explicit(&pool.linger, 0, memory_order_relaxed);
    pthread_mutex_unlock(&pool.job_lock);
}

struct nf4_args { const float *x; int64_t n; const uint8_t *packed; const float *absmax, *code; int64_t out, in, blocksize;
                  float *y; };
struct dense_args { const float *x; int64_t n; const void *w; int64_t out, in; float *y; int bf16; };

static inline float bf16_to_float(uint16_t bits)
{
    union { uint32_t u; float f; } v = {(uint32_t)bits << 16};
    return v.f;
}
struct attention_args { const float *q, *keys, *values; const int32_t *tables; int64_t table_width;
                        const int32_t *lengths; int64_t heads, kv_heads, head_dim, block_size; float scale; float *out; };

/* ---- portable: the definition, vectorized by the compiler where it can ---- */

static void nf4_portable_rows(const void *a, int64_t begin, int64_t end)
{
    const struct nf4_args *args = a;
    const float *x = args->x, *absmax = args->absmax, *code = args->code;
    const uint8_t *packed = args->packed;
    const int64_t n = args->n, out = args->out, in = args->in, blocksize = args->blocksize;
    float *y = args->y;
    for (int64_t o = begin; o < end; o++) {
        const uint8_t *row = packed + o * (in / 2);
        const float *scale = absmax + o * (in / blocksize);
        for (int64_t t = 0; t < n; t++) {
            const float *xt = x + t * in;
            float sum = 0.0f;
            for (int64_t block = 0; block < in / blocksize; block++) {
                const float s = scale[block];
                for (int64_t c = block * (blocksize / 32); c < (block + 1) * (blocksize / 32); c++) {
                    for (int j = 0; j < 16; j++) {
                        uint8_t b = row[c * 16 + j];
                        sum += xt[c * 32 + j] * (code[b & 15] * s);
                        sum += xt[c * 32 + j + 16] * (code[b >> 4] * s);
                    }
                }
            }
            y[t * out + o] = sum;
        }
    }
}

void nf4_linear_portable(const float *x, int64_t n, const uint8_t *packed, const float *absmax, const float *code,
                         int64_t out, int64_t in, int64_t blocksize, float *y, int threads)
{
    struct nf4_args args = {x, n, packed, absmax, code, out, in, blocksize, y};
    parallel_for(out, threads, nf4_portable_rows, &args);
}

struct dequantize_args { const uint8_t *packed; const float *absmax, *code; int64_t in, blocksize; float *w; };

static void dequantize_rows(const void *a, int64_t begin, int64_t end)
{
    const struct dequantize_args *args = a;
    const int64_t in = args->in, blocksize = args->blocksize;
    for (int64_t o = begin; o < end; o++) {
        const uint8_t *row = args->packed + o * (in / 2);
        const float *scale = args->absmax + o * (in / blocksize);
        float *w = args->w + o * in;
        for (int64_t block = 0; block < in / blocksize; block++) {
            const float s = scale[block];
            for (int64_t c = block * (blocksize / 32); c < (block + 1) * (blocksize / 32); c++)
                for (int j = 0; j < 16; j++) {
                    w[c * 32 + j] = args->code[row[c * 16 + j] & 15] * s;
                    w[c * 32 + j + 16] = args->code[row[c * 16 + j] >> 4] * s;
                }
        }
    }
}

void nf4_dequantize_portable(const uint8_t *packed, const float *absmax, const float *code, int64_t out, int64_t in,
                             int64_t blocksize, float *w, int threads)
{
    struct dequantize_args args = {packed, absmax, code, in, blocksize, w};
    parallel_for(out, threads, dequantize_rows, &args);
}

static void dense_portable_rows(const void *a, int64_t begin, int64_t end)
{
    const struct dense_args *args = a;
    const int64_t n = args->n, in = args->in, out = args->out;
    for (int64_t o = begin; o < end; o++) {
        for (int64_t t = 0; t < n; t++) {
            float sum = 0.0f;
            if (args->bf16) {
                const uint16_t *w = (const uint16_t *)args->w + o * in;
                for (int64_t k = 0; k < in; k++) sum += args->x[t * in + k] * bf16_to_float(w[k]);
            } else {
                const float *w = (const float *)args->w + o * in;
                for (int64_t k = 0; k < in; k++) sum += args->x[t * in + k] * w[k];
            }
            args->y[t * out + o] = sum;
        }
    }
}

void dense_linear_portable(const float *x, int64_t n, const void *w, int bf16, int64_t out, int64_t in, float *y,
                           int threads)
{
    struct dense_args args = {x, n, w, out, in, y, bf16};
    parallel_for(out, threads, dense_portable_rows, &args);
}

static void attention_portable_rows(const void *a, int64_t begin, int64_t end)
{
    const struct attention_args *args = a;
    const float *q = args->q, *keys = args->keys, *values = args->values;
    const int32_t *tables = args->tables, *lengths = args->lengths;
    const int64_t table_width = args->table_width, heads = args->heads, kv_heads = args->kv_heads;
    const int64_t head_dim = args->head_dim, block_size = args->block_size, group = heads / kv_heads;
    const float scale = args->scale;
    float *out = args->out;
    for (int64_t bh = begin; bh < end; bh++) {
        const int64_t b = bh / heads, kv_head = (bh % heads) / group;
        const float *qv = q + bh * head_dim;
        float *o = out + bh * head_dim;
        float running_max = -INFINITY, denominator = 0.0f;
        for (int64_t d = 0; d < head_dim; d++) o[d] = 0.0f;
        for (int64_t p = 0; p < lengths[b]; p++) {
            int64_t slot = (int64_t)tables[b * table_width + p / block_size] * block_size + p % block_size;
            const float *k = keys + (slot * kv_heads + kv_head) * head_dim;
            const float *v = values + (slot * kv_heads + kv_head) * head_dim;
            float score = 0.0f;
            for (int64_t d = 0; d < head_dim; d++) score += qv[d] * k[d];
            score *= scale;
            if (score > running_max) {  /* rescale what was summed under the old maximum */
                float c = expf(running_max - score);
                denominator *= c;
                for (int64_t d = 0; d < head_dim; d++) o[d] *= c;
                running_max = score;
            }
            float w = expf(score - running_max);
            denominator += w;
            for (int64_t d = 0; d < head_dim; d++) o[d] += w * v[d];
        }
        for (int64_t d = 0; d < head_dim; d++) o[d] /= denominator;
    }
}

void decode_attention_portable(const float *q, const float *keys, const float *values, const int32_t *tables,
                               int64_t table_width, const int32_t *lengths, int64_t batch, int64_t heads,
                               int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale, float *out,
                               int threads)
{
    struct attention_args args = {q, keys, values, tables, table_width, lengths, heads, kv_heads, head_dim, block_size,
                                  scale, out};
    parallel_for(batch * heads, threads, attention_portable_rows, &args);
}

/* ---- AVX-512 ---- */
#ifdef HAVE_AVX512_VERSION
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f")))

/* One row of W against T (<= TILE) tokens; T is a constant after inlining, so the loops unroll. */
AVX512 static inline __attribute__((always_inline)) void
nf4_row(const float *x, int64_t in, int T, const uint8_t *row, const float *scale, int64_t chunks_per_block,
        __m512 code, float *y, int64_t out)
{
    /* two sums per token (first and second half of each chunk): two independent FMA chains */
    __m512 acc_lo[TILE], acc_hi[TILE];
    for (int t = 0; t < TILE; t++) acc_lo[t] = acc_hi[t] = _mm512_setzero_ps();
    /* block by block: a scale index of c / chunks_per_block would be a 64-bit division per chunk
     * (the divisor is not a constant), which alone set the pace of a one-token step */
    for (int64_t block = 0, c = 0; c < in / 32; block++) {
        const __m512 scaled = _mm512_mul_ps(code, _mm512_set1_ps(scale[block]));  /* code[q] * absmax, per value */
        for (const int64_t block_end = c + chunks_per_block; c < block_end; c++) {
            __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + c * 16)));
            /* vpermps reads only the low 4 bits of each index: the byte itself picks the low nibble's value */
            __m512 w_lo = _mm512_permutexvar_ps(bytes, scaled);
            __m512 w_hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), scaled);
            for (int t = 0; t < TILE; t++) {
                if (t < T) {
                    acc_lo[t] = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(x + t * in + c * 32), acc_lo[t]);
                    acc_hi[t] = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(x + t * in + c * 32 + 16), acc_hi[t]);
                }
            }
        }
    }
    for (int t = 0; t < T; t++) y[t * out] = _mm512_reduce_add_ps(_mm512_add_ps(acc_lo[t], acc_hi[t]));
}

/* nf4_row for up to 4 tokens and blocks of an even number of chunks (blocksize 64, QLoRA's): two
 * chunks at a time, four FMA chains per token. With two, their latency, not the bytes, set the
 * pace of a one-token step (~8 cycles per 16 bytes of codes). */
AVX512 static inline __attribute__((always_inline)) void
nf4_row_pairs(const float *x, int64_t in, int T, const uint8_t *row, const float *scale, int64_t chunks_per_block,
              __m512 code, float *y, int64_t out)
{
    __m512 acc[4][4];
    for (int t = 0; t < 4; t++)
        for (int i = 0; i < 4; i++) acc[i][t] = _mm512_setzero_ps();
    for (int64_t block = 0, c = 0; c < in / 32; block++) {
        const __m512 scaled = _mm512_mul_ps(code, _mm512_set1_ps(scale[block]));  /* code[q] * absmax, per value */
        for (const int64_t block_end = c + chunks_per_block; c < block_end; c += 2) {
            _mm_prefetch((const char *)(row + c * 16 + PREFETCH_BYTES), _MM_HINT_T0);
            __m512i first = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + c * 16)));
            __m512i second = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + c * 16 + 16)));
            __m512 w[4] = {_mm512_permutexvar_ps(first, scaled),
                           _mm512_permutexvar_ps(_mm512_srli_epi32(first, 4), scaled),
                           _mm512_permutexvar_ps(second, scaled),
                           _mm512_permutexvar_ps(_mm512_srli_epi32(second, 4), scaled)};
            for (int t = 0; t < 4; t++)
                if (t < T)
                    for (int i = 0; i < 4; i++)
                        acc[i][t] = _mm512_fmadd_ps(w[i], _mm512_loadu_ps(x + t * in + c * 32 + i * 16), acc[i][t]);
        }
    }
    for (int t = 0; t < T; t++)
        y[t * out] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0][t], acc[1][t]),
                                                        _mm512_add_ps(acc[2][t], acc[3][t])));
}

AVX512 static inline __attribute__((always_inline)) void
dense_row(const float *x, int64_t in, int T, const void *weights, int bf16, float *y, int64_t out)
{
    const float *w = weights;
    const uint16_t *w16 = weights;
    /* a second FMA chain per token where there are at most 2 (one chain's latency set the pace) */
    __m512 acc[TILE], acc2[TILE];
    for (int t = 0; t < TILE; t++) acc[t] = acc2[t] = _mm512_setzero_ps();
    int64_t k = 0;
#define DENSE_LOAD(at) (bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(                           \
                                   _mm256_loadu_si256((const __m256i *)(w16 + (at)))), 16))                          \
                             : _mm512_loadu_ps(w + (at)))
    if (T == 1) {
        __m512 acc3 = _mm512_setzero_ps(), acc4 = _mm512_setzero_ps();
        for (; k + 64 <= in; k += 64) {
            _mm_prefetch((const char *)(bf16 ? (const void *)(w16 + k) : (const void *)(w + k)) + DENSE_PREFETCH_BYTES, _MM_HINT_T0);
            __m512 w0 = DENSE_LOAD(k), w1 = DENSE_LOAD(k + 16), w2 = DENSE_LOAD(k + 32), w3 = DENSE_LOAD(k + 48);
            acc[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), acc[0]);
            acc2[0] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), acc2[0]);
            acc3 = _mm512_fmadd_ps(w2, _mm512_loadu_ps(x + k + 32), acc3);
            acc4 = _mm512_fmadd_ps(w3, _mm512_loadu_ps(x + k + 48), acc4);
        }
        acc[0] = _mm512_add_ps(acc[0], acc3);
        acc2[0] = _mm512_add_ps(acc2[0], acc4);
    }
    if (T <= 2)
        for (; k + 32 <= in; k += 32) {
            __m512 w0 = DENSE_LOAD(k), w1 = DENSE_LOAD(k + 16);
            for (int t = 0; t < T; t++) {
                acc[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * in + k), acc[t]);
                acc2[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * in + k + 16), acc2[t]);
            }
        }
    for (; k + 16 <= in; k += 16) {
        __m512 wk = DENSE_LOAD(k);
        for (int t = 0; t < TILE; t++)
            if (t < T) acc[t] = _mm512_fmadd_ps(wk, _mm512_loadu_ps(x + t * in + k), acc[t]);
    }
#undef DENSE_LOAD
    if (k < in) {
        __mmask16 m = (__mmask16)((1u << (in - k)) - 1);
        uint16_t tail[16] = {0};  /* a masked 16-bit load would need AVX512-BW */
        if (bf16) for (int64_t i = k; i < in; i++) tail[i - k] = w16[i];
        __m512 wk = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                               _mm256_loadu_si256((const __m256i *)tail)), 16))
                         : _mm512_maskz_loadu_ps(m, w + k);
        for (int t = 0; t < TILE; t++)
            if (t < T) acc[t] = _mm512_fmadd_ps(wk, _mm512_maskz_loadu_ps(m, x + t * in + k), acc[t]);
    }
    for (int t = 0; t < T; t++) y[t * out] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t], acc2[t]));
}

#define NF4_ROWS(T) AVX512 static void nf4_rows_##T(const float *x, int64_t in, const uint8_t *packed,            \
    const float *absmax, int64_t blocksize, __m512 code, int64_t o0, int64_t o1, float *y, int64_t out) {           \
    if (T <= 4 && blocksize % 64 == 0)                                                                                \
        for (int64_t o = o0; o < o1; o++)                                                                            \
            nf4_row_pairs(x, in, T, packed + o * (in / 2), absmax + o * (in / blocksize), blocksize / 32, code,      \
                          y + o, out);                                                                               \
    else                                                                                                             \
        for (int64_t o = o0; o < o1; o++)                                                                            \
            nf4_row(x, in, T, packed + o * (in / 2), absmax + o * (in / blocksize), blocksize / 32, code, y + o,     \
                    out); }
#define DENSE_ROWS(T) AVX512 static void dense_rows_##T(const float *x, int64_t in, const void *w,                 \
    int64_t o0, int64_t o1, float *y, int64_t out) {                                                                 \
    for (int64_t o = o0; o < o1; o++) dense_row(x, in, T, (const float *)w + o * in, 0, y + o, out); }              \
    AVX512 static void dense_bf16_rows_##T(const float *x, int64_t in, const void *w,                               \
    int64_t o0, int64_t o1, float *y, int64_t out) {                                                                 \
    for (int64_t o = o0; o < o1; o++) dense_row(x, in, T, (const uint16_t *)w + o * in, 1, y + o, out); }
NF4_ROWS(1) NF4_ROWS(2) NF4_ROWS(3) NF4_ROWS(4) NF4_ROWS(5) NF4_ROWS(6) NF4_ROWS(7) NF4_ROWS(8)
DENSE_ROWS(1) DENSE_ROWS(2) DENSE_ROWS(3) DENSE_ROWS(4) DENSE_ROWS(5) DENSE_ROWS(6) DENSE_ROWS(7) DENSE_ROWS(8)

typedef void (*nf4_rows_fn)(const float *, int64_t, const uint8_t *, const float *, int64_t, __m512, int64_t,
                            int64_t, float *, int64_t);
typedef void (*dense_rows_fn)(const float *, int64_t, const void *, int64_t, int64_t, float *, int64_t);
static const nf4_rows_fn NF4_TILES[TILE + 1] = {0, nf4_rows_1, nf4_rows_2, nf4_rows_3, nf4_rows_4,
                                                nf4_rows_5, nf4_rows_6, nf4_rows_7, nf4_rows_8};
static const dense_rows_fn DENSE_TILES[2][TILE + 1] = {
    {0, dense_rows_1, dense_rows_2, dense_rows_3, dense_rows_4, dense_rows_5, dense_rows_6, dense_rows_7, dense_rows_8},
    {0, dense_bf16_rows_1, dense_bf16_rows_2, dense_bf16_rows_3, dense_bf16_rows_4, dense_bf16_rows_5,
     dense_bf16_rows_6, dense_bf16_rows_7, dense_bf16_rows_8}};

/* tasks are blocks of ROWS_PER_TASK rows; within one, every token tile */
AVX512 static void nf4_avx512_tasks(const void *a, int64_t begin, int64_t end)
{
    const struct nf4_args *args = a;
    const __m512 code = _mm512_loadu_ps(args->code);
    const int64_t n = args->n, in = args->in, out = args->out;
    for (int64_t o0 = begin * ROWS_PER_TASK; o0 < end * ROWS_PER_TASK && o0 < out; o0 += ROWS_PER_TASK) {
        int64_t o1 = o0 + ROWS_PER_TASK < out ? o0 + ROWS_PER_TASK : out;
        for (int64_t t = 0; t < n; t += TILE) {
            int64_t tile = n - t < TILE ? n - t : TILE;
            NF4_TILES[tile](args->x + t * in, in, args->packed, args->absmax, args->blocksize, code, o0, o1,
                            args->y + t * out, out);
        }
    }
}

AVX512 void nf4_linear_avx512(const float *x, int64_t n, const uint8_t *packed, const float *absmax,
                              const float *code, int64_t out, int64_t in, int64_t blocksize, float *y, int threads)
{
    struct nf4_args args = {x, n, packed, absmax, code, out, in, blocksize, y};
    parallel_for((out + ROWS_PER_TASK - 1) / ROWS_PER_TASK, threads, nf4_avx512_tasks, &args);
}

AVX512 static void dense_avx512_tasks(const void *a, int64_t begin, int64_t end)
{
    const struct dense_args *args = a;
    const int64_t n = args->n, in = args->in, out = args->out;
    for (int64_t o0 = begin * ROWS_PER_TASK; o0 < end * ROWS_PER_TASK && o0 < out; o0 += ROWS_PER_TASK) {
        int64_t o1 = o0 + ROWS_PER_TASK < out ? o0 + ROWS_PER_TASK : out;
        for (int64_t t = 0; t < n; t += TILE) {
            int64_t tile = n - t < TILE ? n - t : TILE;
            DENSE_TILES[args->bf16][tile](args->x + t * in, in, args->w, o0, o1, args->y + t * out, out);
        }
    }
}

AVX512 void dense_linear_avx512(const float *x, int64_t n, const void *w, int bf16, int64_t out, int64_t in, float *y,
                                int threads)
{
    struct dense_args args = {x, n, w, out, in, y, bf16};
    parallel_for((out + ROWS_PER_TASK - 1) / ROWS_PER_TASK, threads, dense_avx512_tasks, &args);
}

AVX512 static void dequantize_avx512_rows(const void *a, int64_t begin, int64_t end)
{
    const struct dequantize_args *args = a;
    const int64_t in = args->in, blocksize = args->blocksize, chunks_per_block = blocksize / 32;
    const __m512 code = _mm512_loadu_ps(args->code);
    for (int64_t o = begin; o < end; o++) {
        const uint8_t *row = args->packed + o * (in / 2);
        const float *scale = args->absmax + o * (in / blocksize);
        float *w = args->w + o * in;
        for (int64_t block = 0, c = 0; c < in / 32; block++) {
            const __m512 scaled = _mm512_mul_ps(code, _mm512_set1_ps(scale[block]));  /* code[q] * absmax, per value */
            for (const int64_t block_end = c + chunks_per_block; c < block_end; c++) {
                __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + c * 16)));
                _mm512_storeu_ps(w + c * 32, _mm512_permutexvar_ps(bytes, scaled));
                _mm512_storeu_ps(w + c * 32 + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), scaled));
            }
        }
    }
}

#define MAX_HEAD_CHUNKS 16  /* head_dim up to 256 in registers */

AVX512 static void attention_avx512_rows(const void *a, int64_t begin, int64_t end)
{
    const struct attention_args *args = a;
    const float *q = args->q, *keys = args->keys, *values = args->values;
    const int32_t *tables = args->tables, *lengths = args->lengths;
    const int64_t table_width = args->table_width, heads = args->heads, kv_heads = args->kv_heads;
    const int64_t head_dim = args->head_dim, block_size = args->block_size;
    const int64_t group = heads / kv_heads, chunks = head_dim / 16;
    const float scale = args->scale;
    float *out = args->out;
    for (int64_t bh = begin; bh < end; bh++) {
        const int64_t b = bh / heads, kv_head = (bh % heads) / group;
        __m512 qv[MAX_HEAD_CHUNKS], o[MAX_HEAD_CHUNKS];
        for (int64_t c = 0; c < chunks; c++) {
            qv[c] = _mm512_loadu_ps(q + bh * head_dim + c * 16);
            o[c] = _mm512_setzero_ps();
        }
        float running_max = -INFINITY, denominator = 0.0f;
        for (int64_t p = 0; p < lengths[b]; p++) {
            int64_t slot = (int64_t)tables[b * table_width + p / block_size] * block_size + p % block_size;
            const float *k = keys + (slot * kv_heads + kv_head) * head_dim;
            const float *v = values + (slot * kv_heads + kv_head) * head_dim;
            __m512 dot = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; c++) dot = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + c * 16), dot);
            float score = _mm512_reduce_add_ps(dot) * scale;
            if (score > running_max) {
                __m512 c16 = _mm512_set1_ps(expf(running_max - score));
                denominator *= expf(running_max - score);
                for (int64_t c = 0; c < chunks; c++) o[c] = _mm512_mul_ps(o[c], c16);
                running_max = score;
            }
            float w = expf(score - running_max);
            denominator += w;
            __m512 w16 = _mm512_set1_ps(w);
            for (int64_t c = 0; c < chunks; c++) o[c] = _mm512_fmadd_ps(w16, _mm512_loadu_ps(v + c * 16), o[c]);
        }
        __m512 inverse = _mm512_set1_ps(1.0f / denominator);
        for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(out + bh * head_dim + c * 16, _mm512_mul_ps(o[c], inverse));
    }
}

AVX512 void decode_attention_avx512(const float *q, const float *keys, const float *values, const int32_t *tables,
                                    int64_t table_width, const int32_t *lengths, int64_t batch, int64_t heads,
                                    int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale, float *out,
                                    int threads)
{
    struct attention_args args = {q, keys, values, tables, table_width, lengths, heads, kv_heads, head_dim, block_size,
                                  scale, out};
    parallel_for(batch * heads, threads, attention_avx512_rows, &args);
}

/* Bits 128-511 of zmm0-15 that are not zero, as a mask of 64-bit lanes (see clean_upper_registers;
 * the tests call it after each kernel, through ctypes, whose own code is SSE and leaves them be). */
AVX512 int upper_registers_dirty(void)
{
    unsigned lanes = 0;
    __asm__ volatile("vptestmq %%zmm0, %%zmm0, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     "vptestmq %%zmm1, %%zmm1, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     "vptestmq %%zmm2, %%zmm2, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     "vptestmq %%zmm3, %%zmm3, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     "vptestmq %%zmm4, %%zmm4, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     "vptestmq %%zmm5, %%zmm5, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     "vptestmq %%zmm6, %%zmm6, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     "vptestmq %%zmm7, %%zmm7, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     "vptestmq %%zmm8, %%zmm8, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     "vptestmq %%zmm9, %%zmm9, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     "vptestmq %%zmm10, %%zmm10, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     "vptestmq %%zmm11, %%zmm11, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     "vptestmq %%zmm12, %%zmm12, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     "vptestmq %%zmm13, %%zmm13, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     "vptestmq %%zmm14, %%zmm14, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     "vptestmq %%zmm15, %%zmm15, %%k1\n\tkmovw %%k1, %%eax\n\torl %%eax, %0\n\t"
                     : "+r"(lanes) : : "eax", "k1");
    return (lanes & 0xFC) != 0;
}
#endif


/* ---- AVX2 (most CPUs without AVX-512): the same loops on 8 floats a vector; NF4 codes are
 * looked up byte by byte (a 16-value table does not fit one 8-float permute). ---- */
#ifdef HAVE_AVX2_VERSION
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX2_TILE 4  /* dense rows: 16 ymm registers hold 4 tokens of 2 sums each and the weights */
#define NF4_AVX2_TILE 8

AVX2 static inline float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* The 16 NF4 values byte by byte: planes[k] holds byte k of each value, in both 128-bit lanes
 * (vpshufb's tables). */
AVX2 static void code_planes_avx2(const float *code, __m256i planes[4])
{
    uint8_t bytes[4][16];
    for (int v = 0; v < 16; v++) {
        uint32_t bits;
        memcpy(&bits, code + v, sizeof bits);
        for (int k = 0; k < 4; k++) bytes[k][v] = (uint8_t)(bits >> (8 * k));
    }
    for (int k = 0; k < 4; k++) planes[k] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)bytes[k]));
}

/* code[q] of chunk c's 32 weights, unscaled, by four byte lookups (vpshufb) and interleaves. A
 * 16-value table in 8-float vpermps needs two of them and a blend per 8 weights, which set the pace
 * of a one-token step on Zen 3 (vblendvps issues every other cycle there). The order is
 * xp_order's: w[i] holds weights 4i..4i+3, then 16+4i..19+4i. */
AVX2 static inline __attribute__((always_inline)) void
nf4_codes_avx2(const uint8_t *bytes16, const __m256i planes[4], int few_registers, __m256 w[4])
{
    /* low nibbles in the low lane, high nibbles in the high one. With registers to spare, the 16 bytes
     * are loaded into both lanes (a load, no shuffle) and shifted by 0 or 4 bits a lane: the insert of
     * the shifted half takes a shuffle port, which the lookups below keep busy (one token's NF4 rows,
     * micro-benchmark: 0.83-0.89x the time). With 8 tokens' sums in registers, the two constants it
     * needs made the loop spill. */
    __m256i idx;
    if (few_registers) {
        const __m128i packed = _mm_loadu_si128((const __m128i *)bytes16), nibble = _mm_set1_epi8(15);
        idx = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(packed, nibble)),
                                      _mm_and_si128(_mm_srli_epi16(packed, 4), nibble), 1);
    } else {
        const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)bytes16));
        idx = _mm256_and_si256(_mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                               _mm256_set1_epi8(15));
    }
    const __m256i b0 = _mm256_shuffle_epi8(planes[0], idx), b1 = _mm256_shuffle_epi8(planes[1], idx);
    const __m256i b2 = _mm256_shuffle_epi8(planes[2], idx), b3 = _mm256_shuffle_epi8(planes[3], idx);
    const __m256i low01 = _mm256_unpacklo_epi8(b0, b1), high01 = _mm256_unpackhi_epi8(b0, b1);
    const __m256i low23 = _mm256_unpacklo_epi8(b2, b3), high23 = _mm256_unpackhi_epi8(b2, b3);
    w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(low01, low23));
    w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(low01, low23));
    w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(high01, high23));
    w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(high01, high23));
}

/* x in the order nf4_codes_avx2 forms weights: per chunk of 32, for i = 0..3, x[4i..4i+3] then
 * x[16+4i..19+4i] (once per call; every row of W reads it) */
AVX2 static void xp_order(const float *x, int64_t n, int64_t in, float *xp)
{
    for (int64_t at = 0; at < n * in; at += 32) {
        const __m256 a = _mm256_loadu_ps(x + at), b = _mm256_loadu_ps(x + at + 8);
        const __m256 c = _mm256_loadu_ps(x + at + 16), d = _mm256_loadu_ps(x + at + 24);
        _mm256_storeu_ps(xp + at, _mm256_permute2f128_ps(a, c, 0x20));
        _mm256_storeu_ps(xp + at + 8, _mm256_permute2f128_ps(a, c, 0x31));
        _mm256_storeu_ps(xp + at + 16, _mm256_permute2f128_ps(b, d, 0x20));
        _mm256_storeu_ps(xp + at + 24, _mm256_permute2f128_ps(b, d, 0x31));
    }
}

/* One row of W against T (<= NF4_AVX2_TILE) tokens, x in xp_order. Each chunk's weights are
 * looked up once for all the tokens (a second pass of 4 tokens looked them up again: the lookups,
 * not the bytes, are the cost on AVX2). Chains of FMAs per token: 2 at up to 4 tokens, 1 above.
 * Up to FOLD_TOKENS tokens, a block's codes meet x unscaled and its absmax multiplies their sum
 * once: absmax·Σ code·x, not Σ (code·absmax)·x, one rounding more or less per product, as a
 * different order of the sum would be. That is 4 multiplies a chunk less, of the ~25 ops that set a
 * one-token step's pace (with the nibble split above and blocks of 64 unrolled, one request's
 * decode ran 1.21x as fast). With more tokens the block's sums would not fit in registers. */
#define FOLD_TOKENS 2
AVX2 static inline __attribute__((always_inline)) void
nf4_row_avx2(const float *xp, int64_t in, int T, const uint8_t *row, const float *scale, int64_t chunks_per_block,
             const __m256i planes[4], float *y, int64_t out)
{
    const int chains = T <= 4 ? 2 : 1;
    __m256 acc[2][NF4_AVX2_TILE], total[FOLD_TOKENS];
    for (int i = 0; i < 2; i++)
        for (int t = 0; t < NF4_AVX2_TILE; t++) acc[i][t] = _mm256_setzero_ps();
    for (int t = 0; t < FOLD_TOKENS; t++) total[t] = _mm256_setzero_ps();
    for (int64_t block = 0, c = 0; c < in / 32; block++) {
        const __m256 s = _mm256_set1_ps(scale[block]);
        for (const int64_t block_start = c, block_end = c + chunks_per_block; c < block_end; c++) {
            __m256 w[4];
            if (c % 4 == 0) _mm_prefetch((const char *)(row + c * 16 + PREFETCH_BYTES), _MM_HINT_T0);
            nf4_codes_avx2(row + c * 16, planes, T > 4, w);
            if (T > FOLD_TOKENS)
                for (int i = 0; i < 4; i++) w[i] = _mm256_mul_ps(w[i], s);  /* code[q] * absmax: bitsandbytes' weight */
            for (int t = 0; t < NF4_AVX2_TILE; t++)
                if (t < T)
                    for (int i = 0; i < 4; i++) {
                        const __m256 x = _mm256_loadu_ps(xp + t * in + c * 32 + i * 8);
                        acc[i % chains][t] = T <= FOLD_TOKENS && c == block_start && i < chains
                                                 ? _mm256_mul_ps(w[i], x)
                                                 : _mm256_fmadd_ps(w[i], x, acc[i % chains][t]);
                    }
        }
        if (T <= FOLD_TOKENS)
            for (int t = 0; t < T; t++) total[t] = _mm256_fmadd_ps(s, _mm256_add_ps(acc[0][t], acc[1][t]), total[t]);
    }
    for (int t = 0; t < T; t++) {
        __m256 sum = T <= FOLD_TOKENS ? total[t] : acc[0][t];
        if (T > FOLD_TOKENS)
            for (int i = 1; i < chains; i++) sum = _mm256_add_ps(sum, acc[i][t]);
        y[t * out] = hsum256(sum);
    }
}

AVX2 static inline __attribute__((always_inline)) void
dense_row_avx2(const float *x, int64_t in, int T, const void *weights, int bf16, float *y, int64_t out)
{
    const float *w = weights;
    const uint16_t *w16 = weights;
    __m256 acc_a[AVX2_TILE], acc_b[AVX2_TILE];
    for (int t = 0; t < AVX2_TILE; t++) acc_a[t] = acc_b[t] = _mm256_setzero_ps();
#define DENSE_LOAD8(at) (bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(                          \
                                    _mm_loadu_si128((const __m128i *)(w16 + (at)))), 16))                            \
                              : _mm256_loadu_ps(w + (at)))
    int64_t k = 0;
    for (; k + 16 <= in; k += 16) {
        _mm_prefetch((const char *)(bf16 ? (const void *)(w16 + k) : (const void *)(w + k)) + DENSE_PREFETCH_BYTES, _MM_HINT_T0);
        __m256 w0 = DENSE_LOAD8(k), w1 = DENSE_LOAD8(k + 8);
        for (int t = 0; t < AVX2_TILE; t++)
            if (t < T) {
                acc_a[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * in + k), acc_a[t]);
                acc_b[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * in + k + 8), acc_b[t]);
            }
    }
#undef DENSE_LOAD8
    for (int t = 0; t < T; t++) {
        float sum = hsum256(_mm256_add_ps(acc_a[t], acc_b[t]));
        for (int64_t i = k; i < in; i++) sum += x[t * in + i] * (bf16 ? bf16_to_float(w16[i]) : w[i]);
        y[t * out] = sum;
    }
}

#define NF4_ROWS_AVX2(T) AVX2 static void nf4_rows_avx2_##T(const float *xp, int64_t in, const uint8_t *packed,      \
    const float *absmax, int64_t blocksize, const __m256i *planes, int64_t o0, int64_t o1, float *y, int64_t out) { \
    /* blocks of 64 (QLoRA's) by name for few tokens: a block's two chunks unroll into one straight run (with     \
     * 8 tokens' sums in registers, the unrolled loop spilled) */                                                    \
    for (int64_t o = o0; o < o1; o++)                                                                                \
        if (T <= FOLD_TOKENS && blocksize == 64)                                                                     \
            nf4_row_avx2(xp, in, T, packed + o * (in / 2), absmax + o * (in / 64), 2, planes, y + o, out);           \
        else                                                                                                         \
            nf4_row_avx2(xp, in, T, packed + o * (in / 2), absmax + o * (in / blocksize), blocksize / 32, planes,    \
                         y + o, out); }
#define DENSE_ROWS_AVX2(T) AVX2 static void dense_rows_avx2_##T(const float *x, int64_t in, const void *w, int bf16,   \
    int64_t o0, int64_t o1, float *y, int64_t out) {                                                                 \
    for (int64_t o = o0; o < o1; o++)                                                                                \
        dense_row_avx2(x, in, T, bf16 ? (const void *)((const uint16_t *)w + o * in) : (const void *)((const float *)w \
                       + o * in), bf16, y + o, out); }
NF4_ROWS_AVX2(1) NF4_ROWS_AVX2(2) NF4_ROWS_AVX2(3) NF4_ROWS_AVX2(4)
NF4_ROWS_AVX2(5) NF4_ROWS_AVX2(6) NF4_ROWS_AVX2(7) NF4_ROWS_AVX2(8)
DENSE_ROWS_AVX2(1) DENSE_ROWS_AVX2(2) DENSE_ROWS_AVX2(3) DENSE_ROWS_AVX2(4)

typedef void (*nf4_rows_avx2_fn)(const float *, int64_t, const uint8_t *, const float *, int64_t, const __m256i *,
                                 int64_t, int64_t, float *, int64_t);
typedef void (*dense_rows_avx2_fn)(const float *, int64_t, const void *, int, int64_t, int64_t, float *, int64_t);
static const nf4_rows_avx2_fn NF4_TILES_AVX2[NF4_AVX2_TILE + 1] = {
    0, nf4_rows_avx2_1, nf4_rows_avx2_2, nf4_rows_avx2_3, nf4_rows_avx2_4, nf4_rows_avx2_5, nf4_rows_avx2_6,
    nf4_rows_avx2_7, nf4_rows_avx2_8};
static const dense_rows_avx2_fn DENSE_TILES_AVX2[AVX2_TILE + 1] = {0, dense_rows_avx2_1, dense_rows_avx2_2,
                                                                   dense_rows_avx2_3, dense_rows_avx2_4};

/* Rows of W against many tokens, as a GEMM does it: PANEL_ROWS rows' weights (code[q] · absmax,
 * xp_order) are formed once per slice of K into a panel in L1, then a tile of 4 rows x 2 tokens
 * runs over it, 8 sums in registers, each x and weight load feeding 2 or 4 FMAs. The per-row
 * kernel above loads an x for every FMA, which held it near 1 FMA a cycle at 8 tokens (Zen 3
 * sustains 2). Measured on SmolLM2's projections, 2 cores, 30 layers' weights streamed from memory
 * (paired A/B against the per-row kernel): 1.2x at 16 tokens, 1.3x at 32, 0.98-1.08x at 8, where
 * forming the panel costs as much as the tile (in cache it is 1.2x at 8). Every sum is one chain
 * over K in the same order whatever the tile, so a token's result does not depend on which tokens
 * share its batch. */
#define PANEL_ROWS 4
#define PANEL_CHUNKS 16  /* a slice of 512 weights: the panel is 8 KB */
#define PANEL_TOKENS 32  /* tokens a panel serves before the next slice (their x slices: 64 KB) */
#define PANEL_MIN_TOKENS 6  /* below, the per-row kernel (at 3 tokens the panel took 1.13-1.2x its time) */

AVX2 static inline __attribute__((always_inline)) void
panel_tile(const float *panel, int64_t slice, const float *x0, const float *x1, int two, __m256 acc[8])
{  /* inlined into the two callers below only: inlined where the panel is formed, the NF4 lookup tables
    * held registers and a sum spilled to the stack (a chain through memory: 27 GFLOP/s a core) */
    __m256 a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3], a4 = acc[4], a5 = acc[5], a6 = acc[6], a7 = acc[7];
    for (int64_t k = 0; k < slice; k += 8) {
        __m256 w0 = _mm256_load_ps(panel + k), w1 = _mm256_load_ps(panel + slice + k);
        __m256 w2 = _mm256_load_ps(panel + 2 * slice + k), w3 = _mm256_load_ps(panel + 3 * slice + k);
        /* in registers: folded into each FMA, GCC loaded every weight twice, 10 loads to 8 FMAs */
        __asm__("" : "+x"(w0), "+x"(w1), "+x"(w2), "+x"(w3));
        const __m256 u = _mm256_loadu_ps(x0 + k);
        a0 = _mm256_fmadd_ps(w0, u, a0);
        a1 = _mm256_fmadd_ps(w1, u, a1);
        a2 = _mm256_fmadd_ps(w2, u, a2);
        a3 = _mm256_fmadd_ps(w3, u, a3);
        if (two) {
            const __m256 v = _mm256_loadu_ps(x1 + k);
            a4 = _mm256_fmadd_ps(w0, v, a4);
            a5 = _mm256_fmadd_ps(w1, v, a5);
            a6 = _mm256_fmadd_ps(w2, v, a6);
            a7 = _mm256_fmadd_ps(w3, v, a7);
        }
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3, acc[4] = a4, acc[5] = a5, acc[6] = a6, acc[7] = a7;
}

AVX2 static __attribute__((noinline)) void panel_tile_2(const float *panel, int64_t slice, const float *x0,
                                                       const float *x1, __m256 acc[8])
{
    panel_tile(panel, slice, x0, x1, 1, acc);
}

AVX2 static __attribute__((noinline)) void panel_tile_1(const float *panel, int64_t slice, const float *x0, __m256 acc[8])
{
    panel_tile(panel, slice, x0, 0, 0, acc);
}

/* A panel of PANEL_ROWS rows' weights over one slice of K, in the order of x, from the stored form */
typedef void (*form_panel_fn)(const void *args, int64_t o0, int64_t c0, int64_t chunks, float *panel);

struct nf4_panel_args { const struct nf4_args *args; const __m256i *planes; };

AVX2 static void form_nf4_panel(const void *a, int64_t o0, int64_t c0, int64_t chunks, float *panel)
{
    const struct nf4_panel_args *p = a;
    const int64_t in = p->args->in, blocksize = p->args->blocksize;
    for (int r = 0; r < PANEL_ROWS; r++) {
        const uint8_t *row = p->args->packed + (o0 + r) * (in / 2);
        const float *scale = p->args->absmax + (o0 + r) * (in / blocksize);
        for (int64_t c = c0; c < c0 + chunks; c++) {
            __m256 w[4];
            /* the next panel's rows: while the tile runs no weight load is in flight to keep the hardware
             * prefetcher ahead, and with the weights out of cache the panel lost its lead at 8 tokens */
            if (c % 4 == 0) _mm_prefetch((const char *)(row + c * 16 + PANEL_ROWS * (in / 2)), _MM_HINT_T0);
            nf4_codes_avx2(row + c * 16, p->planes, 0, w);
            const __m256 s = _mm256_set1_ps(scale[c * 32 / blocksize]);
            for (int i = 0; i < 4; i++)
                _mm256_store_ps(panel + r * chunks * 32 + (c - c0) * 32 + i * 8, _mm256_mul_ps(w[i], s));
        }
    }
}

AVX2 static void form_dense_panel(const void *a, int64_t o0, int64_t c0, int64_t chunks, float *panel)
{
    const struct dense_args *args = a;
    const int64_t in = args->in;
    for (int r = 0; r < PANEL_ROWS; r++)
        for (int64_t k = c0 * 32; k < (c0 + chunks) * 32; k += 8) {
            const int64_t at = (o0 + r) * in + k;
            if (k % (args->bf16 ? 32 : 16) == 0)  /* a line of the next panel's rows, as for NF4 */
                _mm_prefetch(args->bf16 ? (const char *)((const uint16_t *)args->w + at + PANEL_ROWS * in)
                                        : (const char *)((const float *)args->w + at + PANEL_ROWS * in), _MM_HINT_T0);
            const __m256 w = args->bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
                                              _mm_loadu_si128((const __m128i *)((const uint16_t *)args->w + at))), 16))
                                        : _mm256_loadu_ps((const float *)args->w + at);
            _mm256_store_ps(panel + r * chunks * 32 + k - c0 * 32, w);
        }
}

/* y for rows o0..o0 + PANEL_ROWS - 1 and tokens (<= PANEL_TOKENS) tokens of x (in the panel's order) */
AVX2 static void panel_rows(form_panel_fn form, const void *form_args, const float *x, int64_t tokens, int64_t in,
                            int64_t o0, float *y, int64_t out)
{
    float panel[PANEL_ROWS * PANEL_CHUNKS * 32] __attribute__((aligned(32)));
    __m256 acc[PANEL_TOKENS / 2][8];
    for (int64_t p = 0; p < (tokens + 1) / 2; p++)
        for (int i = 0; i < 8; i++) acc[p][i] = _mm256_setzero_ps();
    for (int64_t c0 = 0; c0 < in / 32; c0 += PANEL_CHUNKS) {
        const int64_t chunks = in / 32 - c0 < PANEL_CHUNKS ? in / 32 - c0 : PANEL_CHUNKS, slice = chunks * 32;
        form(form_args, o0, c0, chunks, panel);
        const float *xs = x + c0 * 32;
        for (int64_t p = 0; p < tokens / 2; p++)
            panel_tile_2(panel, slice, xs + 2 * p * in, xs + (2 * p + 1) * in, acc[p]);
        if (tokens % 2) panel_tile_1(panel, slice, xs + (tokens - 1) * in, acc[tokens / 2]);
    }
    /* the 4 rows' sums of a token reduced at once (summed one at a time, panel_rows had 4.8% of an 8-row step's samples) */
    for (int64_t t = 0; t < tokens; t++) {
        const __m256 *sums = acc[t / 2] + (t % 2) * 4;
        const __m256 both = _mm256_hadd_ps(_mm256_hadd_ps(sums[0], sums[1]), _mm256_hadd_ps(sums[2], sums[3]));
        _mm_storeu_ps(y + t * out + o0, _mm_add_ps(_mm256_castps256_ps128(both), _mm256_extractf128_ps(both, 1)));
    }
}

/* Rows begin * ROWS_PER_TASK.. of task range [begin, end) on the panel, for all n tokens: blocks of
 * PANEL_TOKENS outermost, so a block's x stays in L2 while this thread's rows pass over it (rows
 * outermost streamed all of x from L3 once per 4 rows: 48-89 GFLOP/s at 512 tokens on 2 cores).
 * Returns the first row it left (a tail under PANEL_ROWS) for the per-row kernels. */
AVX2 static int64_t panel_tasks(form_panel_fn form, const void *form_args, const float *x, int64_t n, int64_t in,
                                float *y, int64_t out, int64_t begin, int64_t end)
{
    const int64_t first = begin * ROWS_PER_TASK, last = end * ROWS_PER_TASK < out ? end * ROWS_PER_TASK : out;
    const int64_t panels_end = first + (last - first) / PANEL_ROWS * PANEL_ROWS;
    for (int64_t t0 = 0; t0 < n; t0 += PANEL_TOKENS) {
        const int64_t tokens = n - t0 < PANEL_TOKENS ? n - t0 : PANEL_TOKENS;
        for (int64_t o0 = first; o0 < panels_end; o0 += PANEL_ROWS)
            panel_rows(form, form_args, x + t0 * in, tokens, in, o0, y + t0 * out, out);
    }
    return panels_end;
}

AVX2 static void nf4_avx2_tasks(const void *a, int64_t begin, int64_t end)
{
    const struct nf4_args *args = a;  /* args->x: in xp_order */
    const int64_t n = args->n, in = args->in, out = args->out;
    __m256i planes[4];
    code_planes_avx2(args->code, planes);
    int64_t o0 = begin * ROWS_PER_TASK;
    if (n >= PANEL_MIN_TOKENS) {
        const struct nf4_panel_args form_args = {args, planes};
        o0 = panel_tasks(form_nf4_panel, &form_args, args->x, n, in, args->y, out, begin, end);
    }
    for (; o0 < end * ROWS_PER_TASK && o0 < out; o0 += ROWS_PER_TASK) {
        int64_t o1 = o0 + ROWS_PER_TASK < out ? o0 + ROWS_PER_TASK : out;
        if (o1 > end * ROWS_PER_TASK) o1 = end * ROWS_PER_TASK;
        for (int64_t t = 0; t < n; t += NF4_AVX2_TILE) {
            int64_t tile = n - t < NF4_AVX2_TILE ? n - t : NF4_AVX2_TILE;
            NF4_TILES_AVX2[tile](args->x + t * in, in, args->packed, args->absmax, args->blocksize, planes, o0, o1,
                                 args->y + t * out, out);
        }
    }
}

AVX2 static void dense_avx2_tasks(const void *a, int64_t begin, int64_t end)
{
    const struct dense_args *args = a;
    const int64_t n = args->n, in = args->in, out = args->out;
    int64_t o0 = begin * ROWS_PER_TASK;
    /* The panel holds whole chunks of 32. Up to 2 tiles of tokens the per-row kernel, which reads the
     * rows once a tile, keeps the LM head (bf16) bandwidth-bound and was 1.1-1.2x faster at 8 tokens;
     * from 16 tokens the panel, which reads them once, was 1.13x (16) and 1.26x (32). */
    if (n > 2 * AVX2_TILE && in % 32 == 0)
        o0 = panel_tasks(form_dense_panel, args, args->x, n, in, args->y, out, begin, end);
    for (; o0 < end * ROWS_PER_TASK && o0 < out; o0 += ROWS_PER_TASK) {
        int64_t o1 = o0 + ROWS_PER_TASK < out ? o0 + ROWS_PER_TASK : out;
        if (o1 > end * ROWS_PER_TASK) o1 = end * ROWS_PER_TASK;
        for (int64_t t = 0; t < n; t += AVX2_TILE) {
            int64_t tile = n - t < AVX2_TILE ? n - t : AVX2_TILE;
            DENSE_TILES_AVX2[tile](args->x + t * in, in, args->w, args->bf16, o0, o1, args->y + t * out, out);
        }
    }
}

AVX2 static void dequantize_avx2_rows(const void *a, int64_t begin, int64_t end)
{
    const struct dequantize_args *args = a;
    const int64_t in = args->in, blocksize = args->blocksize, chunks_per_block = blocksize / 32;
    __m256i planes[4];
    code_planes_avx2(args->code, planes);
    for (int64_t o = begin; o < end; o++) {
        const uint8_t *row = args->packed + o * (in / 2);
        const float *scale = args->absmax + o * (in / blocksize);
        float *w = args->w + o * in;
        for (int64_t block = 0, c = 0; c < in / 32; block++) {
            const __m256 s = _mm256_set1_ps(scale[block]);
            for (const int64_t block_end = c + chunks_per_block; c < block_end; c++) {
                __m256 v[4];
                nf4_codes_avx2(row + c * 16, planes, 0, v);
                for (int i = 0; i < 4; i++) {  /* back from xp_order's order */
                    const __m256 weights = _mm256_mul_ps(v[i], s);
                    _mm_storeu_ps(w + c * 32 + 4 * i, _mm256_castps256_ps128(weights));
                    _mm_storeu_ps(w + c * 32 + 16 + 4 * i, _mm256_extractf128_ps(weights, 1));
                }
            }
        }
    }
}

AVX2 static float dot_avx2(const float *a, const float *b, int64_t n)
{
    __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps(), acc4 = acc3;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {  /* four chains: with one, each FMA waited on the one before it */
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc3);
        acc4 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc4);
    }
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float sum = hsum256(_mm256_add_ps(_mm256_add_ps(acc, acc2), _mm256_add_ps(acc3, acc4)));
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* y[c] += Σj s[j]·bt[j·out + c] for c < n (see expand_portable), 64 columns of y held in registers
 * across the ranks: an axpy per rank loaded and stored y rank times (9% of a step over 4 adapters). */
AVX2 static void expand_avx2(const float *s, int64_t rank, const float *bt, int64_t out, float *y, int64_t n)
{
    int64_t c = 0;
    for (; c + 64 <= n; c += 64) {
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_loadu_ps(y + c + i * 8);
        for (int64_t j = 0; j < rank; j++) {
            if (s[j] == 0.0f) continue;
            const __m256 sj = _mm256_set1_ps(s[j]);
            const float *b = bt + j * out + c;
            for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(sj, _mm256_loadu_ps(b + i * 8), acc[i]);
        }
        for (int i = 0; i < 8; i++) _mm256_storeu_ps(y + c + i * 8, acc[i]);
    }
    for (; c + 8 <= n; c += 8) {
        __m256 acc = _mm256_loadu_ps(y + c);
        for (int64_t j = 0; j < rank; j++)
            if (s[j] != 0.0f) acc = _mm256_fmadd_ps(_mm256_set1_ps(s[j]), _mm256_loadu_ps(bt + j * out + c), acc);
        _mm256_storeu_ps(y + c, acc);
    }
    for (; c < n; c++)
        for (int64_t j = 0; j < rank; j++)
            if (s[j] != 0.0f) y[c] += s[j] * bt[j * out + c];
}

/* e^x for 8 floats: Cephes' expf polynomial (as SLEEF's and avx_mathfun's), within 2 ulp of expf
 * where its result is a normal float; x is clamped to that range, so e^x never overflows. */
AVX2 static inline __m256 exp_avx2(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* x - n·ln 2, ln 2 in two parts */
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(two_n));
}

#define ATTENTION_BLOCK 8  /* positions scored, exponentiated and added to the output together */

/* Online softmax a block of 8 positions at a time: one rescale of the output and one vector exp
 * per block, and the output read and written once per block instead of once per position (a
 * position at a time, the exp and the store-to-load chain through `o` took 14% of a decode step
 * at 8 rows with 256 tokens of context). */
AVX2 static void attention_avx2_rows(const void *a, int64_t begin, int64_t end)
{
    const struct attention_args *args = a;
    const int64_t heads = args->heads, group = heads / args->kv_heads, head_dim = args->head_dim;
    const int64_t block_size = args->block_size, chunks = head_dim / 8;
    for (int64_t bh = begin; bh < end; bh++) {
        const int64_t b = bh / heads, kv_head = (bh % heads) / group, length = args->lengths[b];
        const float *qv = args->q + bh * head_dim;
        float *o = args->out + bh * head_dim;
        float running_max = -INFINITY, denominator = 0.0f;
        for (int64_t d = 0; d < head_dim; d++) o[d] = 0.0f;
        for (int64_t p0 = 0; p0 < length; p0 += ATTENTION_BLOCK) {
            const int n = length - p0 < ATTENTION_BLOCK ? (int)(length - p0) : ATTENTION_BLOCK;
            const float *v[ATTENTION_BLOCK], *k[ATTENTION_BLOCK];
            float weights[ATTENTION_BLOCK];
            for (int i = 0; i < ATTENTION_BLOCK; i++) {  /* lanes past n repeat position p0: read, never used */
                const int64_t p = p0 + (i < n ? i : 0);
                const int64_t slot = (int64_t)args->tables[b * args->table_width + p / block_size] * block_size + p % block_size;
                k[i] = args->keys + (slot * args->kv_heads + kv_head) * head_dim;
                v[i] = args->values + (slot * args->kv_heads + kv_head) * head_dim;
            }
            /* the block's 8 dot products side by side, then summed across together: one at a time, each
             * was a chain of FMAs and a horizontal sum of its own */
            __m256 dot[ATTENTION_BLOCK];
            for (int i = 0; i < ATTENTION_BLOCK; i++) dot[i] = _mm256_setzero_ps();
            for (int64_t c = 0; c < chunks; c++) {
                const __m256 qc = _mm256_loadu_ps(qv + c * 8);
                for (int i = 0; i < ATTENTION_BLOCK; i++) dot[i] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[i] + c * 8), dot[i]);
            }
            const __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(dot[0], dot[1]), _mm256_hadd_ps(dot[2], dot[3]));
            const __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(dot[4], dot[5]), _mm256_hadd_ps(dot[6], dot[7]));
            __m256 scores = _mm256_mul_ps(_mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20),
                                                        _mm256_permute2f128_ps(low, high, 0x31)),
                                          _mm256_set1_ps(args->scale));
            const __m256 used = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n),
                                                                       _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
            __m256 m = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), scores, used);
            m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
            m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
            m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
            const float block_max = _mm256_cvtss_f32(m);
            scores = _mm256_blendv_ps(_mm256_set1_ps(block_max), scores, used);  /* lanes not used */
            if (block_max > running_max) {
                const float c = expf(running_max - block_max);
                denominator *= c;
                for (int64_t i = 0; i < chunks; i++) _mm256_storeu_ps(o + i * 8, _mm256_mul_ps(_mm256_loadu_ps(o + i * 8), _mm256_set1_ps(c)));
                running_max = block_max;
            }
            _mm256_storeu_ps(weights, exp_avx2(_mm256_sub_ps(scores, _mm256_set1_ps(running_max))));
            for (int i = 0; i < n; i++) denominator += weights[i];
            for (int64_t c = 0; c < chunks; c++) {
                __m256 acc = _mm256_loadu_ps(o + c * 8);
                for (int i = 0; i < n; i++) acc = _mm256_fmadd_ps(_mm256_set1_ps(weights[i]), _mm256_loadu_ps(v[i] + c * 8), acc);
                _mm256_storeu_ps(o + c * 8, acc);
            }
        }
        for (int64_t d = 0; d < head_dim; d++) o[d] /= denominator;
    }
}

AVX2 static void rms_norm_avx2(const float *x, const float *weight, int64_t n, float eps, float *out)
{
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), acc);
    float squares = hsum256(acc);
    for (int64_t j = i; j < n; j++) squares += x[j] * x[j];
    const float inverse = 1.0f / sqrtf(squares / (float)n + eps);
    const __m256 inverse8 = _mm256_set1_ps(inverse);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), inverse8)));
    for (; i < n; i++) out[i] = weight[i] * (x[i] * inverse);
}

AVX2 static void silu_mul_avx2(const float *gate, const float *up, int64_t n, float *out)
{
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}
#endif

/* ---- the versions the engine calls ---- */

enum { PORTABLE = 0, WITH_AVX2 = 1, WITH_AVX512 = 2 };

/* The widest version compiled in that this CPU runs. */
int vector_version(void)
{
    static atomic_int chosen = -1;
    int version = atomic_load(&chosen);
    if (version >= 0) return version;
    version = PORTABLE;
    __builtin_cpu_init();
#ifdef HAVE_AVX2_VERSION
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) version = WITH_AVX2;
#endif
#ifdef HAVE_AVX512_VERSION
    if (__builtin_cpu_supports("avx512f")) version = WITH_AVX512;
#endif
    atomic_store(&wide_in_use, version != PORTABLE);
    atomic_store(&chosen, version);
    return version;
}

int has_avx512_version(void) { return vector_version() == WITH_AVX512; }

void nf4_linear_auto(const float *x, int64_t n, const uint8_t *packed, const float *absmax, const float *code,
                     int64_t out, int64_t in, int64_t blocksize, float *y, int threads)
{
#ifdef HAVE_AVX512_VERSION
    if (vector_version() == WITH_AVX512) { nf4_linear_avx512(x, n, packed, absmax, code, out, in, blocksize, y, threads); return; }
#endif
#ifdef HAVE_AVX2_VERSION
    if (vector_version() == WITH_AVX2) {
        /* the caller's own buffer, kept: a decode step makes 120 of these calls */
        static __thread float *xp;
        static __thread int64_t xp_capacity;
        if (n * in > xp_capacity) {
            free(xp);
            xp = malloc(sizeof(float) * (size_t)(n * in));
            if (!xp) abort();
            xp_capacity = n * in;
        }
        xp_order(x, n, in, xp);
        struct nf4_args args = {xp, n, packed, absmax, code, out, in, blocksize, y};
        parallel_for((out + ROWS_PER_TASK - 1) / ROWS_PER_TASK, threads, nf4_avx2_tasks, &args);
        return;
    }
#endif
    nf4_linear_portable(x, n, packed, absmax, code, out, in, blocksize, y, threads);
}

void nf4_dequantize_auto(const uint8_t *packed, const float *absmax, const float *code, int64_t out, int64_t in,
                         int64_t blocksize, float *w, int threads)
{
    struct dequantize_args args = {packed, absmax, code, in, blocksize, w};
#ifdef HAVE_AVX512_VERSION
    if (vector_version() == WITH_AVX512) { parallel_for(out, threads, dequantize_avx512_rows, &args); return; }
#endif
#ifdef HAVE_AVX2_VERSION
    if (vector_version() == WITH_AVX2) { parallel_for(out, threads, dequantize_avx2_rows, &args); return; }
#endif
    parallel_for(out, threads, dequantize_rows, &args);
}

void dense_linear_auto(const float *x, int64_t n, const void *w, int bf16, int64_t out, int64_t in, float *y,
                       int threads)
{
#ifdef HAVE_AVX512_VERSION
    if (vector_version() == WITH_AVX512) { dense_linear_avx512(x, n, w, bf16, out, in, y, threads); return; }
#endif
#ifdef HAVE_AVX2_VERSION
    if (vector_version() == WITH_AVX2) {
        struct dense_args args = {x, n, w, out, in, y, bf16};
        parallel_for((out + ROWS_PER_TASK - 1) / ROWS_PER_TASK, threads, dense_avx2_tasks, &args);
        return;
    }
#endif
    dense_linear_portable(x, n, w, bf16, out, in, y, threads);
}

void decode_attention_auto(const float *q, const float *keys, const float *values, const int32_t *tables,
                           int64_t table_width, const int32_t *lengths, int64_t batch, int64_t heads, int64_t kv_heads,
                           int64_t head_dim, int64_t block_size, float scale, float *out, int threads)
{
#ifdef HAVE_AVX512_VERSION
    if (vector_version() == WITH_AVX512 && head_dim % 16 == 0 && head_dim <= 16 * MAX_HEAD_CHUNKS) {
        decode_attention_avx512(q, keys, values, tables, table_width, lengths, batch, heads, kv_heads, head_dim,
                                block_size, scale, out, threads);
        return;
    }
#endif
#ifdef HAVE_AVX2_VERSION
    if (vector_version() == WITH_AVX2 && head_dim % 8 == 0) {
        struct attention_args args = {q, keys, values, tables, table_width, lengths, heads, kv_heads, head_dim,
                                      block_size, scale, out};
        parallel_for(batch * heads, threads, attention_avx2_rows, &args);
        return;
    }
#endif
    decode_attention_portable(q, keys, values, tables, table_width, lengths, batch, heads, kv_heads, head_dim,
                              block_size, scale, out, threads);
}

/* ---- a whole decode step's decoder layers, one token per row ----
 *
 * The torch model (server/model/llama.py's DecoderLayer) is the definition; this is the same
 * layer in one call, so a decode step pays no per-op dispatch: RMSNorm, q/k/v (NF4 + LoRA), RoPE,
 * the new key/value into the paged cache, attention, o (NF4 + LoRA), residual, RMSNorm, gate/up,
 * SiLU·up, down, residual. `layer_table` holds each layer's pointers (LAYER_FIELDS int64 each, see
 * cpu_kernels.py's DecodeLayers); x [batch, hidden] is updated in place. */

enum { QKV, O, GATE_UP, DOWN, GROUPS };
enum { F_CODES = 0, F_ABSMAX = 4, F_BIAS = 8, F_LORA_A = 12, F_LORA_B = 16, F_INPUT_NORM = 20, F_POST_NORM = 21,
       LAYER_FIELDS = 22 };

#define PTR(type, value) ((type)(uintptr_t)(value))

static float dot_portable(const float *a, const float *b, int64_t n)
{
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

#ifdef HAVE_AVX512_VERSION
AVX512 static float dot_avx512(const float *a, const float *b, int64_t n)
{
    __m512 acc = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {  /* two chains, as dot_avx2's four */
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
        acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc2);
    }
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc, acc2));
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}
#endif

static void rms_norm_portable(const float *x, const float *weight, int64_t n, float eps, float *out)
{
    float squares = 0.0f;
    for (int64_t i = 0; i < n; i++) squares += x[i] * x[i];
    float inverse = 1.0f / sqrtf(squares / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * inverse);
}

static void silu_mul_portable(const float *gate, const float *up, int64_t n, float *out)
{
    for (int64_t i = 0; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* RoPE, rotate-half form: out[d] = v[d]·cos[d] - v[d + half]·sin[d] for d < half, and
 * v[d]·cos[d] + v[d - half]·sin[d] above (two loops without a branch: the compiler vectorizes them) */
static void rope_row(const float *v, const float *cos, const float *sin, int64_t head_dim, float *out)
{
    const int64_t half = head_dim / 2;
    for (int64_t d = 0; d < half; d++) out[d] = v[d] * cos[d] + -v[d + half] * sin[d];
    for (int64_t d = half; d < head_dim; d++) out[d] = v[d] * cos[d] + v[d - half] * sin[d];
}

/* the per-row passes of a decode layer that are not matmuls, in the widest version this CPU runs */
struct row_ops {
    void (*rms_norm)(const float *x, const float *weight, int64_t n, float eps, float *out);
    void (*silu_mul)(const float *gate, const float *up, int64_t n, float *out);
};

struct silu_args { const float *gate_up; int64_t intermediate; float *out; struct row_ops ops; };

#define SILU_COLUMNS 512  /* elements of a row per task */

static void silu_mul_tasks(const void *a, int64_t begin, int64_t end)
{
    const struct silu_args *args = a;
    const int64_t per_row = (args->intermediate + SILU_COLUMNS - 1) / SILU_COLUMNS;
    for (int64_t task = begin; task < end; task++) {
        const int64_t b = task / per_row, c0 = task % per_row * SILU_COLUMNS;
        const int64_t c1 = c0 + SILU_COLUMNS < args->intermediate ? c0 + SILU_COLUMNS : args->intermediate;
        const float *row = args->gate_up + b * 2 * args->intermediate;
        args->ops.silu_mul(row + c0, row + args->intermediate + c0, c1 - c0, args->out + b * args->intermediate + c0);
    }
}

/* y[c] += Σj s[j]·bt[j·out + c] for c < n, ranks in order; s[j] == 0 is a rank above the adapter's
 * own (zero-padded to max_rank) and is skipped. The readable reference of the vector versions. */
static void expand_portable(const float *s, int64_t rank, const float *bt, int64_t out, float *y, int64_t n)
{
    for (int64_t j = 0; j < rank; j++)
        if (s[j] != 0.0f)
            for (int64_t c = 0; c < n; c++) y[c] += s[j] * bt[j * out + c];
}

#ifdef HAVE_AVX512_VERSION
AVX512 static void expand_avx512(const float *s, int64_t rank, const float *bt, int64_t out, float *y, int64_t n)
{
    int64_t c = 0;
    for (; c + 64 <= n; c += 64) {
        __m512 acc[4];
        for (int i = 0; i < 4; i++) acc[i] = _mm512_loadu_ps(y + c + i * 16);
        for (int64_t j = 0; j < rank; j++) {
            if (s[j] == 0.0f) continue;
            const __m512 sj = _mm512_set1_ps(s[j]);
            const float *b = bt + j * out + c;
            for (int i = 0; i < 4; i++) acc[i] = _mm512_fmadd_ps(sj, _mm512_loadu_ps(b + i * 16), acc[i]);
        }
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(y + c + i * 16, acc[i]);
    }
    for (; c + 16 <= n; c += 16) {
        __m512 acc = _mm512_loadu_ps(y + c);
        for (int64_t j = 0; j < rank; j++)
            if (s[j] != 0.0f) acc = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), _mm512_loadu_ps(bt + j * out + c), acc);
        _mm512_storeu_ps(y + c, acc);
    }
    for (; c < n; c++)
        for (int64_t j = 0; j < rank; j++)
            if (s[j] != 0.0f) y[c] += s[j] * bt[j * out + c];
}
#endif

struct lora_args {
    const float *x; int64_t in; float *y; int64_t out; int64_t batch; const int64_t *token_slots;
    const float *lora_a, *scaled_b_t; int64_t rank; const int64_t *starts; int slices;
    float (*dot)(const float *, const float *, int64_t);
    void (*expand)(const float *, int64_t, const float *, int64_t, float *, int64_t);
    /* filled by lora_apply: the rows of each adapter slot in use, and their A·x */
    int64_t groups, *group_slot, *group_start, *rows; float *shrunk;  /* shrunk [batch, slices * rank] */
};

#define LORA_COLUMNS 64  /* columns of y per expand task */

/* shrink: tasks are (slot in use, row of A), each a dot product per row of that slot */
static void lora_shrink(const void *a, int64_t begin, int64_t end)
{
    const struct lora_args *args = a;
    const int64_t width = args->slices * args->rank, in = args->in;
    for (int64_t task = begin; task < end; task++) {
        const int64_t group = task / width, r = task % width, slot = args->group_slot[group];
        const float *a_row = args->lora_a + (slot * width + r) * in;
        for (int64_t i = args->group_start[group]; i < args->group_start[group + 1]; i++)
            args->shrunk[args->rows[i] * width + r] = args->dot(a_row, args->x + args->rows[i] * in, in);
    }
}

/* expand: tasks are LORA_COLUMNS columns of y, each adding every row's sBᵀ·(A·x) there */
static void lora_expand(const void *a, int64_t begin, int64_t end)
{
    const struct lora_args *args = a;
    const int64_t width = args->slices * args->rank, out = args->out, rank = args->rank;
    for (int64_t task = begin; task < end; task++) {
        const int64_t c0 = task * LORA_COLUMNS, c1 = c0 + LORA_COLUMNS < out ? c0 + LORA_COLUMNS : out;
        for (int i = 0; i < args->slices; i++) {
            const int64_t lo = args->starts[i] > c0 ? args->starts[i] : c0;
            const int64_t hi = args->starts[i + 1] < c1 ? args->starts[i + 1] : c1;
            if (lo >= hi) continue;
            for (int64_t group = 0; group < args->groups; group++) {
                const float *bt = args->scaled_b_t + args->group_slot[group] * rank * out;
                for (int64_t k = args->group_start[group]; k < args->group_start[group + 1]; k++) {
                    const int64_t row = args->rows[k];
                    args->expand(args->shrunk + row * width + i * rank, rank, bt + lo, out, args->y + row * out + lo,
                                 hi - lo);
                }
            }
        }
    }
}

/* y[b] += sBᵀ[s]·(A[s]·x[b]) for each slice of the group, s = the row's adapter slot (0: none).
 * Two regions, each split evenly over the threads whatever the slots: rows of A (shrink), then
 * columns of y (expand). Tasks by slot left a thread idle with one adapter in use, and with 4
 * adapters in the low half of 8 slots one thread did all of it (the adapters' float32 weights are
 * more bytes per step than the NF4 base at a few adapters). */
static void lora_apply(struct lora_args *args, int64_t num_slots, int threads)
{
    int64_t *counts = calloc((size_t)num_slots, sizeof(int64_t));
    int64_t *group_slot = malloc(sizeof(int64_t) * (size_t)num_slots), *group_start = malloc(sizeof(int64_t) * (size_t)(num_slots + 1));
    int64_t *rows = malloc(sizeof(int64_t) * (size_t)args->batch), *next = malloc(sizeof(int64_t) * (size_t)num_slots);
    float *shrunk = malloc(sizeof(float) * (size_t)(args->batch * args->slices * args->rank));
    if (!counts || !group_slot || !group_start || !rows || !next || !shrunk) abort();
    for (int64_t b = 0; b < args->batch; b++)
        if (args->token_slots[b] > 0) counts[args->token_slots[b]]++;
    int64_t groups = 0, placed = 0;
    for (int64_t slot = 1; slot < num_slots; slot++)
        if (counts[slot]) {
            group_slot[groups] = slot, group_start[groups] = placed, next[slot] = placed;
            placed += counts[slot], groups++;
        }
    group_start[groups] = placed;
    for (int64_t b = 0; b < args->batch; b++)
        if (args->token_slots[b] > 0) rows[next[args->token_slots[b]]++] = b;
    if (groups) {
        args->groups = groups, args->group_slot = group_slot, args->group_start = group_start, args->rows = rows;
        args->shrunk = shrunk;
        parallel_for(groups * args->slices * args->rank, threads, lora_shrink, args);
        parallel_for((args->out + LORA_COLUMNS - 1) / LORA_COLUMNS, threads, lora_expand, args);
    }
    free(counts), free(group_slot), free(group_start), free(rows), free(next), free(shrunk);
}

/* shape: hidden, heads, kv_heads, head_dim, intermediate, block_size, max_rank, nf4 blocksize, kv_layer_stride,
 * LoRA slots (slot 0 included) */
void decode_layers(const int64_t *shape, float eps, const float *code, const int64_t *layer_table, int64_t num_layers,
                   float *x, int64_t batch, const float *cos, const float *sin, const int64_t *cache_slots,
                   float *keys, float *values, const int32_t *tables, int64_t table_width, const int32_t *lengths,
                   const int64_t *token_slots, float *work, int threads)
{
    clean_upper_registers();  /* torch's own AVX-512 kernels ran before this call */
    atomic_store_explicit(&pool.linger, 1, memory_order_relaxed);
    atomic_store_explicit(&pool.in_layers, 1, memory_order_relaxed);
    const int64_t hidden = shape[0], heads = shape[1], kv_heads = shape[2], head_dim = shape[3];
    const int64_t intermediate = shape[4], block_size = shape[5], rank = shape[6], blocksize = shape[7];
    const int64_t kv_layer_stride = shape[8], num_slots = shape[9];
    const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim, qkv_size = q_size + 2 * kv_size;
    const int64_t out[GROUPS] = {qkv_size, hidden, 2 * intermediate, hidden};
    const int64_t in[GROUPS] = {hidden, q_size, hidden, intermediate};
    const int64_t qkv_starts[4] = {0, q_size, q_size + kv_size, qkv_size};
    const int64_t o_starts[2] = {0, hidden}, gate_up_starts[3] = {0, intermediate, 2 * intermediate};
    const int64_t *starts[GROUPS] = {qkv_starts, o_starts, gate_up_starts, o_starts};
    const int slices[GROUPS] = {3, 1, 2, 1};
    float (*dot)(const float *, const float *, int64_t) = dot_portable;
    void (*expand)(const float *, int64_t, const float *, int64_t, float *, int64_t) = expand_portable;
    struct row_ops ops = {rms_norm_portable, silu_mul_portable};
#ifdef HAVE_AVX512_VERSION
    if (vector_version() == WITH_AVX512) dot = dot_avx512, expand = expand_avx512;
#endif
#ifdef HAVE_AVX2_VERSION
    if (vector_version() == WITH_AVX2) dot = dot_avx2, expand = expand_avx2;
    if (vector_version() >= WITH_AVX2) ops = (struct row_ops){rms_norm_avx2, silu_mul_avx2};  /* AVX-512 CPUs run AVX2 */
#endif
    float *h = work, *qkv = h + batch * hidden, *q = qkv + batch * qkv_size, *attn = q + batch * q_size;
    float *proj = attn + batch * q_size, *gate_up = proj + batch * hidden, *mlp = gate_up + batch * 2 * intermediate;

    for (int64_t l = 0; l < num_layers; l++) {
        const int64_t *f = layer_table + l * LAYER_FIELDS;
        float *layer_keys = keys + l * kv_layer_stride, *layer_values = values + l * kv_layer_stride;
        #define PROJECT(group, input, output)                                                                         \
            do {                                                                                                      \
                nf4_linear_auto(input, batch, PTR(const uint8_t *, f[F_CODES + group]),                               \
                                PTR(const float *, f[F_ABSMAX + group]), code, out[group], in[group], blocksize,      \
                                output, threads);                                                                      \
                const float *bias = PTR(const float *, f[F_BIAS + group]);                                            \
                if (bias) for (int64_t b = 0; b < batch; b++)                                                         \
                    for (int64_t c = 0; c < out[group]; c++) output[b * out[group] + c] += bias[c];                   \
                if (token_slots) {                                                                                     \
                    struct lora_args lora = {input, in[group], output, out[group], batch, token_slots,                 \
                                             PTR(const float *, f[F_LORA_A + group]),                                  \
                                             PTR(const float *, f[F_LORA_B + group]), rank, starts[group],             \
                                             slices[group], dot, expand, 0, 0, 0, 0, 0};                                 \
                    lora_apply(&lora, num_slots, threads);                                                             \
                }                                                                                                      \
            } while (0)

        for (int64_t b = 0; b < batch; b++)
            ops.rms_norm(x + b * hidden, PTR(const float *, f[F_INPUT_NORM]), hidden, eps, h + b * hidden);
        PROJECT(QKV, h, qkv);
        for (int64_t b = 0; b < batch; b++) {  /* RoPE; the new key and value into the cache */
            const float *row = qkv + b * qkv_size, *c = cos + b * head_dim, *s = sin + b * head_dim;
            for (int64_t hd = 0; hd < heads; hd++)
                rope_row(row + hd * head_dim, c, s, head_dim, q + (b * heads + hd) * head_dim);
            float *key = layer_keys + cache_slots[b] * kv_size, *value = layer_values + cache_slots[b] * kv_size;
            for (int64_t hd = 0; hd < kv_heads; hd++)
                rope_row(row + q_size + hd * head_dim, c, s, head_dim, key + hd * head_dim);
            memcpy(value, row + q_size + kv_size, sizeof(float) * (size_t)kv_size);
        }
        decode_attention_auto(q, layer_keys, layer_values, tables, table_width, lengths, batch, heads, kv_heads,
                              head_dim, block_size, 1.0f / sqrtf((float)head_dim), attn, threads);
        PROJECT(O, attn, proj);
        for (int64_t i = 0; i < batch * hidden; i++) x[i] += proj[i];

        for (int64_t b = 0; b < batch; b++)
            ops.rms_norm(x + b * hidden, PTR(const float *, f[F_POST_NORM]), hidden, eps, h + b * hidden);
        PROJECT(GATE_UP, h, gate_up);
        const struct silu_args silu = {gate_up, intermediate, mlp, ops};
        parallel_for(batch * ((intermediate + SILU_COLUMNS - 1) / SILU_COLUMNS), batch > 1 ? threads : 1,  /* one row: */
                     silu_mul_tasks, &silu);  /* ~1 us of work, less than handing it out */
        PROJECT(DOWN, mlp, proj);
        for (int64_t i = 0; i < batch * hidden; i++) x[i] += proj[i];
        #undef PROJECT
    }
    atomic_store_explicit(&pool.in_layers, 0, memory_order_relaxed);  /* linger stays on for the LM head */
}

/* y[t] += sBᵀ[s]·(A[s]·x[t]) for every token t on slot s = token_slots[t] (0: none), one pool of
 * `slices` projections sharing an input (starts: their first output columns, then out). The LoRA
 * of a prefill (many tokens per row) under kernels="cpu"; y is updated in place. */
void lora_add(const float *x, int64_t in, float *y, int64_t out, int64_t tokens, const int64_t *token_slots,
              const float *lora_a, const float *scaled_b_t, int64_t rank, const int64_t *starts, int64_t slices,
              int64_t num_slots, int threads)
{
    float (*dot)(const float *, const float *, int64_t) = dot_portable;
    void (*expand)(const float *, int64_t, const float *, int64_t, float *, int64_t) = expand_portable;
#ifdef HAVE_AVX512_VERSION
    if (vector_version() == WITH_AVX512) dot = dot_avx512, expand = expand_avx512;
#endif
#ifdef HAVE_AVX2_VERSION
    if (vector_version() == WITH_AVX2) dot = dot_avx2, expand = expand_avx2;
#endif
    struct lora_args args = {x, in, y, out, tokens, token_slots, lora_a, scaled_b_t, rank, starts, (int)slices, dot, expand,
                             0, 0, 0, 0, 0};
    lora_apply(&args, num_slots, threads);
}
