/* Cobblestone-256 chunk batches over AES-256-GCM (IPsec-MB or OpenSSL 3 EVP: encfs_aes.c),
 * and secure memory.
 *
 * A batch is a task: its chunks are claimed in small ascending groups by the caller's thread
 * and by helpers from a persistent pool (started once, kept asleep between batches, rather
 * than threads started per batch). The key is expanded once (aes_key_t, shared read-only);
 * each participant owns one AES context and sets only the IV per chunk. Participants share the lowest
 * failing chunk index so work past a known failure stops early; the caller zeroes the
 * destination from that chunk on once every helper has left the task.
 *
 * Unverified plaintext never reaches the destination: each chunk is opened into the
 * participant's own 16 KiB scratch (hot in L1/L2) and copied out only once its tag verified,
 * so another thread reading the destination while a call runs (a shared window, a user's
 * array) can never see a forged chunk's bytes. The scratch is cleansed when the participant
 * leaves the task. The pread variant reads each group's ciphertext straight into the
 * destination (tags aside; ciphertext is public), then opens it from there into scratch and
 * copies the verified plaintext back while it is still in cache: one copy out of the page
 * cache instead of two. */
#define _GNU_SOURCE
#include "encfs_native.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "encfs_aes.h"

/* A schedule inside caller memory of encfs_aes_key_size() bytes, at its first 64-byte boundary. */
static aes_key_t *key_in(const void *ks) {
    return ks ? (aes_key_t *)(((uintptr_t)ks + 63) & ~(uintptr_t)63) : NULL;
}

static void chunk_iv(uint8_t iv[ENCFS_NONCE_SIZE], const uint8_t *base, uint64_t index) {
    memcpy(iv, base, ENCFS_NONCE_SIZE);
    for (int k = 0; k < 8; k++) iv[ENCFS_NONCE_SIZE - 1 - k] ^= (uint8_t)(index >> (8 * k));
}

static int overlaps(const void *a, size_t alen, const void *b, size_t blen) {
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return alen && blen && x < y + blen && y < x + alen;
}

static void atomic_min(int64_t *p, int64_t v) {
    int64_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < cur && !__atomic_compare_exchange_n(p, &cur, v, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
    }
}

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* ---- per-thread scratch: where a chunk is opened before its tag has verified ---- */

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok;

/* Sanitizer builds take the scratch from malloc, where ASan checks its bounds (it does not
 * check inside an mmap); ordinary builds map whole pages and keep them out of core dumps. */
#if defined(__SANITIZE_ADDRESS__)
#define SCRATCH_HEAP 1
#else
#define SCRATCH_HEAP 0
#endif

/* A chunk plus one page: the chunk is opened at the offset that keeps the copy out of the
 * scratch clear of the destination's 4 KiB alias (see scratch_at). */
#define SCRATCH_BYTES (ENCFS_CHUNK_SIZE + 4096)

static void scratch_free(void *p) {
    if (p == NULL) return;
    OPENSSL_cleanse(p, SCRATCH_BYTES);
    if (SCRATCH_HEAP)
        free(p);
    else
        munmap(p, SCRATCH_BYTES);
}

static void make_scratch_key(void) { scratch_key_ok = pthread_key_create(&scratch_key, scratch_free) == 0; }

/* This thread's 20 KiB scratch (whole pages, kept out of core dumps), mapped on first use and
 * cleansed and unmapped when the thread exits; NULL when none can be had. Not mlocked: one
 * chunk per thread would eat into a small RLIMIT_MEMLOCK that key slabs need, and it is
 * cleansed at the end of every task. */
static uint8_t *thread_scratch(void) {
    pthread_once(&scratch_once, make_scratch_key);
    if (!scratch_key_ok) return NULL;
    uint8_t *p = pthread_getspecific(scratch_key);
    if (p) return p;
    void *m;
    if (SCRATCH_HEAP) {
        if ((m = malloc(SCRATCH_BYTES)) == NULL) return NULL;
    } else {
        m = mmap(NULL, SCRATCH_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return NULL;
        encfs_exclude_from_dumps(m, SCRATCH_BYTES);
    }
    if (pthread_setspecific(scratch_key, m) != 0) {
        scratch_free(m);
        return NULL;
    }
    return m;
}

/* ---- tasks: a span of chunks claimed in groups ---- */

#define GROUP_CHUNKS 8 /* 128 KiB: a group's ciphertext and plaintext stay in L2 */

typedef struct task task_t;
typedef struct {
    aes_ctx_t aes;    /* this participant's AES state (OpenSSL: keyed on first use) */
    uint8_t *scratch; /* decrypt: this thread's scratch mapping, fetched on first use */
    uint8_t *work;    /* where in it chunks are opened for this task (scratch_at) */
    size_t dirty;     /* bytes at work to cleanse when leaving */
} part_t;
typedef void (*group_fn)(task_t *t, part_t *me, size_t begin, size_t end);

struct task {
    group_fn fn;
    const aes_key_t *key; /* expanded once, read by every participant */
    const uint8_t *nonce;
    uint64_t first_index;
    const uint8_t *in; /* memory variants: the input span */
    size_t in_len;     /* bytes of input (ciphertext for decrypt, plaintext for encrypt) */
    uint8_t *out;
    size_t nchunks;
    int final;      /* encrypt: the last chunk is the short final one */
    int fd;         /* pread variant: the file and the offset of the span's first chunk */
    int64_t offset;
    size_t next;         /* next relative chunk to claim (atomic) */
    int64_t lowest_fail; /* decrypt: relative index of the lowest failed chunk (INT64_MAX: none) */
    int crypto_error;    /* atomic: OpenSSL refused an operation */
    int os_error;        /* atomic: first errno of a failed read (0: none) */
    int truncated;       /* atomic: the file ended inside the span */
};

static int task_failed(task_t *t) {
    return __atomic_load_n(&t->crypto_error, __ATOMIC_RELAXED) || __atomic_load_n(&t->os_error, __ATOMIC_RELAXED) ||
           __atomic_load_n(&t->truncated, __ATOMIC_RELAXED);
}

/* Claim groups in ascending order until none are left. Every later claim lies above any
 * failure seen now, so stopping at a failure skips only chunks that get zeroed. */
static void participate(task_t *t) {
    part_t me;
    memset(&me, 0, sizeof me);
    size_t c;
    while ((c = __atomic_fetch_add(&t->next, GROUP_CHUNKS, __ATOMIC_RELAXED)) < t->nchunks) {
        if ((int64_t)c > __atomic_load_n(&t->lowest_fail, __ATOMIC_RELAXED) || task_failed(t)) break;
        t->fn(t, &me, c, c + GROUP_CHUNKS < t->nchunks ? c + GROUP_CHUNKS : t->nchunks);
    }
    aes_ctx_done(&me.aes);
    if (me.work && me.dirty) OPENSSL_cleanse(me.work, me.dirty);
}

/* The place in scratch to open this task's chunks: 256 bytes past the destination's offset in
 * its page. Every chunk's destination has the same page offset (chunks are 16 KiB apart); a
 * copy whose destination sits 16 bytes past its source modulo 4 KiB (a page-aligned scratch
 * and a buffer from malloc's mmap, e.g. a large bytearray) runs at a tenth of the speed on
 * some CPUs (AMD Zen 3: 3 GB/s instead of 45), which halved decrypt throughput. */
static uint8_t *scratch_at(uint8_t *scratch, const uint8_t *dst) {
    return scratch + (((uintptr_t)dst + 256) & 4095);
}

/* This thread's scratch; 0 (crypto_error set) when none can be had. */
static int decrypt_ready(task_t *t, part_t *me) {
    if (me->scratch == NULL && (me->scratch = thread_scratch()) == NULL) {
        __atomic_store_n(&t->crypto_error, 1, __ATOMIC_RELAXED);
        return 0;
    }
    me->work = scratch_at(me->scratch, t->out);
    return 1;
}

/* Plaintext bytes of relative chunk c in a decrypt task (in_len is ciphertext). */
static size_t ct_chunk_plain(const task_t *t, size_t c) {
    return c + 1 == t->nchunks ? t->in_len - c * ENCFS_CT_CHUNK_SIZE - ENCFS_TAG_SIZE : ENCFS_CHUNK_SIZE;
}

/* Open one chunk of len bytes from in (which may be dst) into this participant's scratch and,
 * only once its tag verified, copy it to dst: a failed chunk's bytes never reach dst.
 * 1: verified, 0: tag failed (published), -1: crypto error. */
static int open_chunk(task_t *t, part_t *me, size_t c, const uint8_t *in, uint8_t *dst, size_t len,
                      const uint8_t *tag) {
    uint8_t iv[ENCFS_NONCE_SIZE];
    if (len > me->dirty) me->dirty = len;
    chunk_iv(iv, t->nonce, t->first_index + c);
    int rc = aes_open(&me->aes, t->key, iv, NULL, 0, in, len, tag, me->work);
    if (rc < 0) {
        __atomic_store_n(&t->crypto_error, 1, __ATOMIC_RELAXED);
        return -1;
    }
    if (rc == 0) {
        atomic_min(&t->lowest_fail, (int64_t)c);
        return 0;
    }
    if (len) memcpy(dst, me->work, len);
    return 1;
}

static void decrypt_group(task_t *t, part_t *me, size_t begin, size_t end) {
    if (!decrypt_ready(t, me)) return;
    for (size_t c = begin; c < end; c++) {
        const uint8_t *in = t->in + c * ENCFS_CT_CHUNK_SIZE;
        size_t len = ct_chunk_plain(t, c);
        if (open_chunk(t, me, c, in, t->out + c * ENCFS_CHUNK_SIZE, len, in + len) != 1) return;
    }
}

/* preadv until every iovec is full or the file ends; bytes read, or -1 with errno set. */
static ssize_t preadv_full(int fd, struct iovec *iov, int cnt, int64_t offset) {
    size_t total = 0;
    while (cnt > 0) {
        ssize_t n = preadv(fd, iov, cnt, (off_t)(offset + (int64_t)total));
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (n == 0) break;
        total += (size_t)n;
        while (cnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return (ssize_t)total;
}

static void pread_decrypt_group(task_t *t, part_t *me, size_t begin, size_t end) {
    uint8_t tags[GROUP_CHUNKS][ENCFS_TAG_SIZE];
    struct iovec iov[2 * GROUP_CHUNKS];
    size_t want = 0;
    int k = 0;
    for (size_t c = begin; c < end; c++) {
        size_t len = ct_chunk_plain(t, c);
        iov[k++] = (struct iovec){t->out + c * ENCFS_CHUNK_SIZE, len};
        iov[k++] = (struct iovec){tags[c - begin], ENCFS_TAG_SIZE};
        want += len + ENCFS_TAG_SIZE;
    }
    ssize_t got = preadv_full(t->fd, iov, k, t->offset + (int64_t)(begin * ENCFS_CT_CHUNK_SIZE));
    if (got < 0) {
        int none = 0, err = errno ? errno : EIO;
        __atomic_compare_exchange_n(&t->os_error, &none, err, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
        return;
    }
    if ((size_t)got < want) {
        __atomic_store_n(&t->truncated, 1, __ATOMIC_RELAXED);
        return;
    }
    if (!decrypt_ready(t, me)) return;
    for (size_t c = begin; c < end; c++) {
        uint8_t *p = t->out + c * ENCFS_CHUNK_SIZE; /* ciphertext now, plaintext once verified */
        if (open_chunk(t, me, c, p, p, ct_chunk_plain(t, c), tags[c - begin]) != 1) return;
    }
}

static void encrypt_group(task_t *t, part_t *me, size_t begin, size_t end) {
    uint8_t iv[ENCFS_NONCE_SIZE];
    for (size_t c = begin; c < end; c++) {
        const uint8_t *in = t->in + c * ENCFS_CHUNK_SIZE;
        size_t len = c + 1 == t->nchunks && t->final ? t->in_len - c * ENCFS_CHUNK_SIZE : ENCFS_CHUNK_SIZE;
        uint8_t *out = t->out + c * ENCFS_CT_CHUNK_SIZE;
        chunk_iv(iv, t->nonce, t->first_index + c);
        if (aes_seal(&me->aes, t->key, iv, NULL, 0, in, len, out, out + len) != 1) {
            __atomic_store_n(&t->crypto_error, 1, __ATOMIC_RELAXED);
            return;
        }
    }
}

/* ---- the helper pool ----
 * One per process: a child after fork() starts from none (a pthread_atfork handler forgets
 * the parent's, whose threads do not exist there and whose lock may be held). One caller at a
 * time owns it; a concurrent caller runs its task alone, so callers on several Python threads
 * still use the cores. Helpers join the current task through `state` (CLOSED | helpers
 * inside); the owner closes it after its own share and waits for those inside to leave, so a
 * helper never touches a task that has returned. Waits spin briefly, then sleep. */

#define POOL_CLOSED 0x40000000
#define SPIN_NS 50000

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;   /* a new task (helpers wait on it) */
    pthread_cond_t left; /* the last helper left a closed task (the owner waits on it) */
    unsigned gen;        /* atomic: bumped for every task */
    int state;           /* atomic */
    int max_helpers;     /* atomic: helpers the current task accepts */
    int nworkers;        /* threads started (owner only) */
    task_t *task;
    char busy; /* atomic flag: a caller owns the pool */
} pool_t;

static pool_t *the_pool;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void forget_pool_in_child(void) { __atomic_store_n(&the_pool, NULL, __ATOMIC_RELAXED); }

static void register_atfork(void) { pthread_atfork(NULL, NULL, forget_pool_in_child); }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Spin up to SPIN_NS while done(p, arg) is false; true when it became true. */
static int spin_until(pool_t *p, int (*done)(pool_t *, unsigned), unsigned arg) {
    uint64_t until = now_ns() + SPIN_NS;
    for (int i = 1; !done(p, arg); i++) {
        cpu_relax();
        if (i % 64 == 0 && now_ns() > until) return 0;
    }
    return 1;
}

static int gen_moved(pool_t *p, unsigned seen) { return __atomic_load_n(&p->gen, __ATOMIC_ACQUIRE) != seen; }

static int helpers_left(pool_t *p, unsigned unused) {
    (void)unused;
    return (__atomic_load_n(&p->state, __ATOMIC_ACQUIRE) & ~POOL_CLOSED) == 0;
}

static void *helper_main(void *arg) {
    pool_t *p = arg;
    unsigned seen = __atomic_load_n(&p->gen, __ATOMIC_ACQUIRE);
    for (;;) {
        if (!spin_until(p, gen_moved, seen)) {
            pthread_mutex_lock(&p->mu);
            while (!gen_moved(p, seen)) pthread_cond_wait(&p->cv, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        seen = __atomic_load_n(&p->gen, __ATOMIC_ACQUIRE);
        int s = __atomic_load_n(&p->state, __ATOMIC_ACQUIRE);
        while (!(s & POOL_CLOSED) && s < __atomic_load_n(&p->max_helpers, __ATOMIC_RELAXED)) {
            if (__atomic_compare_exchange_n(&p->state, &s, s + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                participate(p->task);
                if (__atomic_sub_fetch(&p->state, 1, __ATOMIC_RELEASE) == POOL_CLOSED) {
                    pthread_mutex_lock(&p->mu);
                    pthread_cond_broadcast(&p->left);
                    pthread_mutex_unlock(&p->mu);
                }
                break;
            }
        }
    }
    return NULL;
}

static pool_t *get_pool(void) {
    pool_t *p = __atomic_load_n(&the_pool, __ATOMIC_ACQUIRE);
    if (p) return p;
    pthread_once(&atfork_once, register_atfork);
    pool_t *fresh = calloc(1, sizeof *fresh);
    if (fresh == NULL) return NULL;
    fresh->state = POOL_CLOSED;
    pthread_mutex_init(&fresh->mu, NULL);
    pthread_cond_init(&fresh->cv, NULL);
    pthread_cond_init(&fresh->left, NULL);
    if (__atomic_compare_exchange_n(&the_pool, &p, fresh, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return fresh;
    pthread_cond_destroy(&fresh->left);
    pthread_cond_destroy(&fresh->cv);
    pthread_mutex_destroy(&fresh->mu);
    free(fresh);
    return p;
}

/* Start helpers up to `want` (owner only); returns how many exist. */
static int grow_pool(pool_t *p, int want) {
    if (p->nworkers >= want) return p->nworkers;
    pthread_attr_t attr;
    sigset_t all, old;
    if (pthread_attr_init(&attr) != 0) return p->nworkers;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* helpers take no signals */
    while (p->nworkers < want) {
        pthread_t tid;
        if (pthread_create(&tid, &attr, helper_main, p) != 0) break;
        p->nworkers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return p->nworkers;
}

/* Run a task on the caller's thread and up to nthreads - 1 helpers. */
static void run_task(task_t *t, int nthreads) {
    size_t groups = (t->nchunks + GROUP_CHUNKS - 1) / GROUP_CHUNKS;
    int helpers = nthreads < 1 ? 0 : nthreads > ENCFS_MAX_THREADS ? ENCFS_MAX_THREADS - 1 : nthreads - 1;
    if ((size_t)helpers >= groups) helpers = groups ? (int)groups - 1 : 0;
    pool_t *p = helpers > 0 ? get_pool() : NULL;
    if (p == NULL || __atomic_test_and_set(&p->busy, __ATOMIC_ACQUIRE)) {
        participate(t);
        return;
    }
    helpers = grow_pool(p, helpers) < helpers ? p->nworkers : helpers;
    p->task = t;
    __atomic_store_n(&p->max_helpers, helpers, __ATOMIC_RELAXED);
    __atomic_store_n(&p->state, 0, __ATOMIC_RELEASE);
    pthread_mutex_lock(&p->mu);
    __atomic_add_fetch(&p->gen, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    participate(t);
    __atomic_fetch_or(&p->state, POOL_CLOSED, __ATOMIC_ACQ_REL);
    if (!spin_until(p, helpers_left, 0)) { /* a helper is still reading or opening its group */
        pthread_mutex_lock(&p->mu);
        while (!helpers_left(p, 0)) pthread_cond_wait(&p->left, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
    p->task = NULL;
    __atomic_clear(&p->busy, __ATOMIC_RELEASE);
}

/* Checks shared by both decrypt entry points: sizes, index range; plaintext bytes or error. */
static int64_t decrypt_span(uint64_t first_index, size_t ct_len, uint8_t *out, size_t out_cap, size_t *nchunks) {
    size_t full = ct_len / ENCFS_CT_CHUNK_SIZE, last = ct_len % ENCFS_CT_CHUNK_SIZE;
    if (last && last < ENCFS_TAG_SIZE) return ENCFS_E_FORMAT;
    *nchunks = full + (last ? 1 : 0);
    size_t total = full * ENCFS_CHUNK_SIZE + (last ? last - ENCFS_TAG_SIZE : 0);
    if (first_index > ENCFS_MAX_CHUNKS || *nchunks > ENCFS_MAX_CHUNKS - first_index) return ENCFS_E_RANGE;
    if (out_cap < total || (total && out == NULL)) return ENCFS_E_SPACE;
    return (int64_t)total;
}

/* After a decrypt task: zero what must not be released and pick the return code. The
 * destination from the lowest failed chunk on holds only old bytes, ciphertext (pread) or
 * verified plaintext of later chunks, never a failed chunk's: it is zeroed all the same, so
 * a failed call leaves nothing past the verified prefix. */
static int64_t finish_decrypt(task_t *t, size_t total, int64_t *failed_index, int *os_error) {
    int64_t rc = ENCFS_E_CRYPTO;
    if (t->crypto_error) {
    } else if (t->os_error) {
        if (os_error) *os_error = t->os_error;
        rc = ENCFS_E_IO;
    } else if (t->truncated) {
        rc = ENCFS_E_TRUNCATED;
    } else if (t->lowest_fail != INT64_MAX) {
        size_t from = (size_t)t->lowest_fail * ENCFS_CHUNK_SIZE;
        OPENSSL_cleanse(t->out + from, total - from);
        if (failed_index) *failed_index = (int64_t)(t->first_index + (uint64_t)t->lowest_fail);
        return ENCFS_E_AUTH;
    } else {
        return (int64_t)total;
    }
    OPENSSL_cleanse(t->out, total);
    return rc;
}

int64_t encfs_decrypt_chunks_ks(const void *ks, const uint8_t *base_nonce, uint64_t first_index,
                                const uint8_t *ct, size_t ct_len, uint8_t *out, size_t out_cap,
                                int nthreads, int64_t *failed_index) {
    if (failed_index) *failed_index = -1;
    const aes_key_t *k = key_in(ks);
    if (k == NULL || base_nonce == NULL || (ct_len && (ct == NULL))) return ENCFS_E_ARG;
    if (!aes_key_ok(k)) return ENCFS_E_ARG;
    size_t nchunks;
    int64_t total = decrypt_span(first_index, ct_len, out, out_cap, &nchunks);
    if (total < 0) return total;
    if (overlaps(ct, ct_len, out, (size_t)total)) return ENCFS_E_OVERLAP;
    if (nchunks == 0) return 0;
    task_t t = {decrypt_group, k, base_nonce, first_index, ct, ct_len, out, nchunks, 0, -1, 0, 0, INT64_MAX, 0, 0, 0};
    run_task(&t, nthreads);
    return finish_decrypt(&t, (size_t)total, failed_index, NULL);
}

int64_t encfs_pread_decrypt_chunks_ks(int fd, int64_t offset, const void *ks, const uint8_t *base_nonce,
                                      uint64_t first_index, size_t ct_len, uint8_t *out, size_t out_cap,
                                      int nthreads, int64_t *failed_index, int *os_error) {
    if (failed_index) *failed_index = -1;
    if (os_error) *os_error = 0;
    const aes_key_t *k = key_in(ks);
    if (k == NULL || base_nonce == NULL || fd < 0 || offset < 0) return ENCFS_E_ARG;
    if (!aes_key_ok(k)) return ENCFS_E_ARG;
    size_t nchunks;
    int64_t total = decrypt_span(first_index, ct_len, out, out_cap, &nchunks);
    if (total < 0) return total;
    if (ct_len > (size_t)(INT64_MAX - offset)) return ENCFS_E_RANGE;
    if (nchunks == 0) return 0;
    task_t t = {pread_decrypt_group, k, base_nonce, first_index, NULL, ct_len, out, nchunks, 0, fd, offset, 0, INT64_MAX, 0, 0, 0};
    run_task(&t, nthreads);
    return finish_decrypt(&t, (size_t)total, failed_index, os_error);
}

int64_t encfs_encrypt_chunks_ks(const void *ks, const uint8_t *base_nonce, uint64_t first_index,
                                const uint8_t *pt, size_t pt_len, int final, uint8_t *out,
                                size_t out_cap, int nthreads) {
    const aes_key_t *k = key_in(ks);
    if (k == NULL || base_nonce == NULL || (pt_len && pt == NULL)) return ENCFS_E_ARG;
    if (!aes_key_ok(k)) return ENCFS_E_ARG;
    size_t nchunks = pt_len / ENCFS_CHUNK_SIZE;
    if (final)
        nchunks += 1;
    else if (pt_len % ENCFS_CHUNK_SIZE)
        return ENCFS_E_FORMAT;
    if (first_index > ENCFS_MAX_CHUNKS || nchunks > ENCFS_MAX_CHUNKS - first_index) return ENCFS_E_RANGE;
    size_t total = pt_len + nchunks * ENCFS_TAG_SIZE;
    if (out_cap < total || (total && out == NULL)) return ENCFS_E_SPACE;
    if (overlaps(pt, pt_len, out, total)) return ENCFS_E_OVERLAP;
    if (nchunks == 0) return 0;
    task_t t = {encrypt_group, k, base_nonce, first_index, pt, pt_len, out, nchunks, final != 0, -1, 0, 0, INT64_MAX, 0, 0, 0};
    run_task(&t, nthreads);
    if (t.crypto_error) {
        OPENSSL_cleanse(out, total);
        return ENCFS_E_CRYPTO;
    }
    return (int64_t)total;
}

/* ---- the raw-key entry points: a schedule on the stack for the one call ---- */

typedef struct {
    uint8_t bytes[sizeof(aes_key_t) + 64];
} stack_key_t;

static const void *stack_key(stack_key_t *s, const uint8_t *key, int impl, int64_t *rc) {
    *rc = key == NULL ? ENCFS_E_ARG : aes_key_init(key_in(s->bytes), key, impl);
    return *rc < 0 ? NULL : s->bytes;
}

int64_t encfs_decrypt_chunks(const uint8_t *key, const uint8_t *base_nonce, uint64_t first_index,
                             const uint8_t *ct, size_t ct_len, uint8_t *out, size_t out_cap,
                             int nthreads, int64_t *failed_index) {
    stack_key_t s;
    int64_t rc;
    if (failed_index) *failed_index = -1;
    if (stack_key(&s, key, ENCFS_AES_AUTO, &rc))
        rc = encfs_decrypt_chunks_ks(s.bytes, base_nonce, first_index, ct, ct_len, out, out_cap, nthreads, failed_index);
    OPENSSL_cleanse(&s, sizeof s);
    return rc;
}

int64_t encfs_pread_decrypt_chunks(int fd, int64_t offset, const uint8_t *key, const uint8_t *base_nonce,
                                   uint64_t first_index, size_t ct_len, uint8_t *out, size_t out_cap,
                                   int nthreads, int64_t *failed_index, int *os_error) {
    stack_key_t s;
    int64_t rc;
    if (failed_index) *failed_index = -1;
    if (os_error) *os_error = 0;
    if (stack_key(&s, key, ENCFS_AES_AUTO, &rc))
        rc = encfs_pread_decrypt_chunks_ks(fd, offset, s.bytes, base_nonce, first_index, ct_len, out, out_cap, nthreads,
                                           failed_index, os_error);
    OPENSSL_cleanse(&s, sizeof s);
    return rc;
}

int64_t encfs_encrypt_chunks(const uint8_t *key, const uint8_t *base_nonce, uint64_t first_index,
                             const uint8_t *pt, size_t pt_len, int final, uint8_t *out,
                             size_t out_cap, int nthreads) {
    stack_key_t s;
    int64_t rc;
    if (stack_key(&s, key, ENCFS_AES_AUTO, &rc))
        rc = encfs_encrypt_chunks_ks(s.bytes, base_nonce, first_index, pt, pt_len, final, out, out_cap, nthreads);
    OPENSSL_cleanse(&s, sizeof s);
    return rc;
}

/* ---- single-shot AES-256-GCM with AAD ---- */

static int64_t gcm_check(const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                         const uint8_t *aad, size_t aad_len, const void *in, size_t in_len) {
    if (key == NULL || iv == NULL || key_len != ENCFS_KEY_SIZE || iv_len != ENCFS_NONCE_SIZE) return ENCFS_E_ARG;
    if ((aad_len && aad == NULL) || (in_len && in == NULL)) return ENCFS_E_ARG;
    if (aad_len > INT_MAX || in_len > INT_MAX) return ENCFS_E_ARG;
    return 0;
}

int64_t encfs_gcm_seal_impl(int impl, const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                            const uint8_t *aad, size_t aad_len, const uint8_t *pt, size_t pt_len,
                            uint8_t *out, size_t out_cap) {
    int64_t rc = gcm_check(key, key_len, iv, iv_len, aad, aad_len, pt, pt_len);
    if (rc) return rc;
    if (out == NULL || out_cap < pt_len + ENCFS_TAG_SIZE) return ENCFS_E_SPACE;
    stack_key_t s;
    aes_ctx_t c;
    memset(&c, 0, sizeof c);
    if (stack_key(&s, key, impl, &rc)) {
        rc = aes_seal(&c, key_in(s.bytes), iv, aad, aad_len, pt, pt_len, out, out + pt_len) == 1
                 ? (int64_t)(pt_len + ENCFS_TAG_SIZE)
                 : ENCFS_E_CRYPTO;
        if (rc < 0) OPENSSL_cleanse(out, pt_len + ENCFS_TAG_SIZE);
    }
    aes_ctx_done(&c);
    OPENSSL_cleanse(&s, sizeof s);
    return rc;
}

/* The plaintext is opened into out directly: a single-shot caller owns out alone, and it is
 * cleansed before a failure returns. */
int64_t encfs_gcm_open_impl(int impl, const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                            const uint8_t *aad, size_t aad_len, const uint8_t *ct, size_t ct_len,
                            uint8_t *out, size_t out_cap) {
    int64_t rc = gcm_check(key, key_len, iv, iv_len, aad, aad_len, ct, ct_len);
    if (rc) return rc;
    if (ct_len < ENCFS_TAG_SIZE) return ENCFS_E_FORMAT;
    size_t pt_len = ct_len - ENCFS_TAG_SIZE;
    if (out_cap < pt_len || (pt_len && out == NULL)) return ENCFS_E_SPACE;
    stack_key_t s;
    aes_ctx_t c;
    memset(&c, 0, sizeof c);
    if (stack_key(&s, key, impl, &rc)) {
        int ok = aes_open(&c, key_in(s.bytes), iv, aad, aad_len, ct, pt_len, ct + pt_len, pt_len ? out : NULL);
        rc = ok == 1 ? (int64_t)pt_len : ok == 0 ? ENCFS_E_AUTH : ENCFS_E_CRYPTO;
        if (rc < 0 && pt_len) OPENSSL_cleanse(out, pt_len);
    }
    aes_ctx_done(&c);
    OPENSSL_cleanse(&s, sizeof s);
    return rc;
}

int64_t encfs_gcm_seal(const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                       const uint8_t *aad, size_t aad_len, const uint8_t *pt, size_t pt_len,
                       uint8_t *out, size_t out_cap) {
    return encfs_gcm_seal_impl(ENCFS_AES_OPENSSL, key, key_len, iv, iv_len, aad, aad_len, pt, pt_len, out, out_cap);
}

int64_t encfs_gcm_open(const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                       const uint8_t *aad, size_t aad_len, const uint8_t *ct, size_t ct_len,
                       uint8_t *out, size_t out_cap) {
    return encfs_gcm_open_impl(ENCFS_AES_OPENSSL, key, key_len, iv, iv_len, aad, aad_len, ct, ct_len, out, out_cap);
}

/* ---- AES implementations ---- */

size_t encfs_aes_key_size(void) { return sizeof(aes_key_t) + 64; }

int encfs_aes_available(int impl) { return aes_available(impl); }

int encfs_aes_built(int impl) {
#ifdef ENCFS_HAVE_IPSEC_MB
    if (impl == ENCFS_AES_IPSEC_MB) return 1;
#endif
    return impl == ENCFS_AES_OPENSSL || impl == ENCFS_AES_AUTO;
}

int encfs_aes_key_init(void *ks, const uint8_t *key, int impl) { return aes_key_init(key_in(ks), key, impl); }

int encfs_aes_key_impl(const void *ks) {
    const aes_key_t *k = key_in(ks);
    return aes_key_ok(k) ? k->impl : ENCFS_E_ARG;
}

const char *encfs_aes_describe(int impl) {
    const char *d = aes_describe(impl);
    return d ? d : "unavailable";
}

/* ---- secure memory ---- */

static uint64_t mlock_fallbacks;
static uint64_t locked_bytes;

static size_t page_round(size_t n) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return (n + page - 1) / page * page;
}

void encfs_exclude_from_dumps(void *p, size_t n) {
#ifdef MADV_DONTDUMP
    if (p && n) (void)madvise(p, page_round(n), MADV_DONTDUMP);
#endif
}

int encfs_secure_lock(void *p, size_t n) {
    if (p == NULL || n == 0) return 0;
    encfs_exclude_from_dumps(p, n);
    if (mlock(p, n) != 0) {
        __atomic_add_fetch(&mlock_fallbacks, 1, __ATOMIC_RELAXED);
        return 0;
    }
    __atomic_add_fetch(&locked_bytes, page_round(n), __ATOMIC_RELAXED);
    return 1;
}

int encfs_secure_relock(void *p, size_t n) {
    if (p == NULL || n == 0) return 0;
    if (mlock(p, n) == 0) return 1;
    __atomic_sub_fetch(&locked_bytes, page_round(n), __ATOMIC_RELAXED);
    __atomic_add_fetch(&mlock_fallbacks, 1, __ATOMIC_RELAXED);
    return 0;
}

void encfs_secure_wipe_unlock(void *p, size_t n, int locked) {
    if (p == NULL || n == 0) return;
    OPENSSL_cleanse(p, n);
    if (locked && munlock(p, n) == 0) __atomic_sub_fetch(&locked_bytes, page_round(n), __ATOMIC_RELAXED);
}

void encfs_cleanse(void *p, size_t n) {
    if (p && n) OPENSSL_cleanse(p, n);
}

uint64_t encfs_mlock_fallbacks(void) { return __atomic_load_n(&mlock_fallbacks, __ATOMIC_RELAXED); }

uint64_t encfs_locked_bytes(void) { return __atomic_load_n(&locked_bytes, __ATOMIC_RELAXED); }

int encfs_mlock_probe(void) {
    size_t len = page_round(1);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 0;
    int ok = mlock(p, len) == 0;
    if (ok) munlock(p, len);
    munmap(p, len);
    return ok;
}

const char *encfs_openssl_version(void) { return OpenSSL_version(OPENSSL_VERSION); }
