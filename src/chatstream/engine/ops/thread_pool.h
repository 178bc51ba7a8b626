/* chatstream's one pool of helper threads for its C kernels: a parallel-for over `items`, cut into
 * chunks that the caller and its helpers claim one at a time from one atomic counter; the caller
 * returns once every chunk is done. No barrier waits for a thread that never started: on a busy
 * machine, where a helper may not be scheduled for milliseconds, the caller simply does the chunks
 * itself (OpenMP's end-of-region barrier, tried first, made a decode step up to 10x slower on a
 * loaded 2-core machine). Helpers spin briefly between jobs (a layer's kernels come microseconds
 * apart), then sleep.
 *
 * Both shared libraries (kernels.c, quant/kernels.c) include this file, but the process runs ONE
 * pool: kernels.c exports its pool_run as `chatstream_pool_run`, and chatstream.engine.quant hands
 * that address to quant/kernels.c (`quant_use_pool`), whose own copy then never starts a thread.
 * Two pools would spin against each other on a small machine. Needs -pthread. */
#ifndef CHATSTREAM_THREAD_POOL_H
#define CHATSTREAM_THREAD_POOL_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

/* Runs items [begin, end) of a job; `ctx` is the caller's. */
typedef void (*pool_task)(const void *ctx, int64_t begin, int64_t end);
/* pool_run's signature: how another library calls the process's pool. */
typedef void (*pool_run_fn)(pool_task task, const void *ctx, int64_t items, int64_t chunk, int threads);

#define POOL_MAX_THREADS 64
#define POOL_SPIN_ROUNDS 20000 /* pause instructions a helper waits before sleeping (~0.1-1 ms) */

typedef struct {
    pool_task task;
    const void *ctx;
    int64_t items, chunk, chunks;
    int helpers; /* helpers that may join: the caller's thread count - 1 */
} pool_job_t;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t state; /* generation << 32 | next chunk to claim */
    _Atomic int64_t done;   /* chunks finished in this generation */
    _Atomic int sleeping;
    _Atomic int64_t helped; /* chunks helpers have run, ever (the tests' proof that a job was split) */
    pool_job_t job;
    int started;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, {0}, 0};

static inline void pool_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claim and run chunks of generation `gen` until none is left. */
static inline void pool_work_on(uint32_t gen, int helper) {
    for (;;) {
        uint64_t state = atomic_load_explicit(&pool.state, memory_order_acquire);
        if ((uint32_t)(state >> 32) != gen) return;
        const int64_t chunk = (int64_t)(uint32_t)state;
        const pool_job_t *job = &pool.job;
        if (chunk >= job->chunks) return; /* (a closed generation's 0xFFFFFFFF too) */
        if (!atomic_compare_exchange_weak_explicit(&pool.state, &state, state + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        /* The job cannot change before this chunk is counted done. */
        const int64_t i0 = chunk * job->chunk, i1 = i0 + job->chunk < job->items ? i0 + job->chunk : job->items;
        job->task(job->ctx, i0, i1);
        if (helper) atomic_fetch_add_explicit(&pool.helped, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_acq_rel);
    }
}

static inline void *pool_helper_main(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint32_t seen = 0;
    for (;;) {
        uint32_t gen = seen;
        for (int i = 0; i < POOL_SPIN_ROUNDS && gen == seen; i++) {
            pool_relax();
            gen = (uint32_t)(atomic_load_explicit(&pool.state, memory_order_acquire) >> 32);
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleeping, 1);
            while ((gen = (uint32_t)(atomic_load(&pool.state) >> 32)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = gen;
        if (index < pool.job.helpers) pool_work_on(gen, 1);
    }
    return NULL;
}

static inline void pool_forget_in_child(void) { pool.started = 0; } /* a fork's child has none of the threads */

/* Start helpers up to `count`; returns how many run. */
static inline int pool_ensure_helpers(int count) {
    if (count > POOL_MAX_THREADS - 1) count = POOL_MAX_THREADS - 1;
    if (pool.started == 0) pthread_atfork(NULL, NULL, pool_forget_in_child);
    while (pool.started < count) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&thread, &attr, pool_helper_main, (void *)(intptr_t)pool.started);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.started++;
    }
    return pool.started < count ? pool.started : count;
}

static pthread_mutex_t pool_caller_mu = PTHREAD_MUTEX_INITIALIZER; /* one job at a time uses the pool */

/* task(ctx, begin, end) over [0, items) on up to `threads` threads (the caller's included), in
 * chunks of `chunk` items (0: about four a thread, small enough to even out, large enough to
 * keep a chunk's memory streaming). A job while another thread's holds the pool runs on the caller. */
static inline void pool_run(pool_task task, const void *ctx, int64_t items, int64_t chunk, int threads) {
    if (items <= 0) return;
    if (threads > items) threads = (int)items;
    if (threads <= 1 || pthread_mutex_trylock(&pool_caller_mu) != 0) {
        task(ctx, 0, items);
        return;
    }
    const int helpers = pool_ensure_helpers(threads - 1);
    if (chunk <= 0) chunk = items / (4 * (int64_t)(helpers + 1));
    chunk = chunk < 1 ? 1 : chunk;
    pool.job = (pool_job_t){task, ctx, items, chunk, (items + chunk - 1) / chunk, helpers};
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    const uint32_t gen = (uint32_t)(atomic_load(&pool.state) >> 32) + 1;
    atomic_store_explicit(&pool.state, (uint64_t)gen << 32, memory_order_release);
    if (atomic_load(&pool.sleeping) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    pool_work_on(gen, 0);
    for (int64_t spins = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < pool.job.chunks; spins++) {
        if (spins < 4000) pool_relax();
        else sched_yield(); /* a helper was descheduled mid-chunk: give it the core */
    }
    /* Closed: a helper still holding this generation's number claims nothing from the next job. */
    atomic_store_explicit(&pool.state, (uint64_t)gen << 32 | 0xFFFFFFFFu, memory_order_release);
    pthread_mutex_unlock(&pool_caller_mu);
}

#endif
