/* Cobblestone-256 chunk batches over OpenSSL 3 EVP AES-256-GCM, and secure memory.
 *
 * A batch is split into contiguous runs of chunks, one per thread; each thread owns one
 * EVP_CIPHER_CTX, sets the key once and only the IV per chunk. Threads share the lowest
 * failing chunk index so work past a known failure stops early; the caller zeroes the
 * plaintext from that chunk on after every thread has joined. */
#define _GNU_SOURCE
#include "encfs_native.h"

#include <limits.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

static EVP_CIPHER *gcm_cipher;
static pthread_once_t gcm_once = PTHREAD_ONCE_INIT;

static void fetch_gcm(void) { gcm_cipher = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL); }

static const EVP_CIPHER *aes256gcm(void) {
    pthread_once(&gcm_once, fetch_gcm);
    return gcm_cipher;
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

typedef struct {
    const EVP_CIPHER *cipher;
    const uint8_t *key;
    const uint8_t *nonce;
    uint64_t first_index;
    const uint8_t *in;
    size_t in_len;
    uint8_t *out;
    size_t nchunks;
    int final; /* encrypt: the last chunk is the short final one */
    int64_t *lowest_fail; /* decrypt: relative index of the lowest failed chunk (INT64_MAX: none) */
    int *crypto_error;
} batch_t;

typedef struct {
    const batch_t *b;
    size_t begin, end; /* relative chunk range [begin, end) */
} job_t;

/* Decrypt one run of chunks. A failed tag is published to lowest_fail and ends the run;
 * chunks above an already-published failure are skipped, as their output gets zeroed. */
static void *decrypt_run(void *arg) {
    const job_t *j = arg;
    const batch_t *b = j->b;
    uint8_t iv[ENCFS_NONCE_SIZE];
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL || EVP_DecryptInit_ex2(ctx, b->cipher, b->key, NULL, NULL) != 1) {
        __atomic_store_n(b->crypto_error, 1, __ATOMIC_RELAXED);
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    for (size_t c = j->begin; c < j->end; c++) {
        if ((int64_t)c > __atomic_load_n(b->lowest_fail, __ATOMIC_RELAXED) ||
            __atomic_load_n(b->crypto_error, __ATOMIC_RELAXED))
            break;
        const uint8_t *in = b->in + c * ENCFS_CT_CHUNK_SIZE;
        size_t in_len = c + 1 == b->nchunks ? b->in_len - c * ENCFS_CT_CHUNK_SIZE : ENCFS_CT_CHUNK_SIZE;
        size_t pt_len = in_len - ENCFS_TAG_SIZE;
        uint8_t *out = b->out + c * ENCFS_CHUNK_SIZE;
        int outl = 0, finl = 0;
        chunk_iv(iv, b->nonce, b->first_index + c);
        if (EVP_DecryptInit_ex2(ctx, NULL, NULL, iv, NULL) != 1 ||
            (pt_len && EVP_DecryptUpdate(ctx, out, &outl, in, (int)pt_len) != 1) ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, ENCFS_TAG_SIZE, (void *)(in + pt_len)) != 1) {
            __atomic_store_n(b->crypto_error, 1, __ATOMIC_RELAXED);
            break;
        }
        if (EVP_DecryptFinal_ex(ctx, out + outl, &finl) != 1) {
            atomic_min(b->lowest_fail, (int64_t)c);
            break;
        }
    }
    EVP_CIPHER_CTX_free(ctx);
    return NULL;
}

static void *encrypt_run(void *arg) {
    const job_t *j = arg;
    const batch_t *b = j->b;
    uint8_t iv[ENCFS_NONCE_SIZE];
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL || EVP_EncryptInit_ex2(ctx, b->cipher, b->key, NULL, NULL) != 1) {
        __atomic_store_n(b->crypto_error, 1, __ATOMIC_RELAXED);
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    for (size_t c = j->begin; c < j->end; c++) {
        if (__atomic_load_n(b->crypto_error, __ATOMIC_RELAXED)) break;
        const uint8_t *in = b->in + c * ENCFS_CHUNK_SIZE;
        size_t pt_len = c + 1 == b->nchunks && b->final ? b->in_len - c * ENCFS_CHUNK_SIZE : ENCFS_CHUNK_SIZE;
        uint8_t *out = b->out + c * ENCFS_CT_CHUNK_SIZE;
        int outl = 0, finl = 0;
        chunk_iv(iv, b->nonce, b->first_index + c);
        if (EVP_EncryptInit_ex2(ctx, NULL, NULL, iv, NULL) != 1 ||
            (pt_len && EVP_EncryptUpdate(ctx, out, &outl, in, (int)pt_len) != 1) ||
            EVP_EncryptFinal_ex(ctx, out + outl, &finl) != 1 ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, ENCFS_TAG_SIZE, out + pt_len) != 1) {
            __atomic_store_n(b->crypto_error, 1, __ATOMIC_RELAXED);
            break;
        }
    }
    EVP_CIPHER_CTX_free(ctx);
    return NULL;
}

/* Run the batch on up to nthreads threads (the caller's thread takes the first run). A
 * thread that cannot be started has its run done by the caller instead. */
static int run_batch(const batch_t *b, int nthreads, void *(*fn)(void *)) {
    size_t n = b->nchunks;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > ENCFS_MAX_THREADS) nthreads = ENCFS_MAX_THREADS;
    if ((size_t)nthreads > n) nthreads = n ? (int)n : 1;
    if (nthreads == 1) {
        job_t only = {b, 0, n};
        fn(&only);
        return 0;
    }
    job_t jobs[ENCFS_MAX_THREADS];
    pthread_t tids[ENCFS_MAX_THREADS];
    int started[ENCFS_MAX_THREADS];
    for (int t = 0; t < nthreads; t++) {
        jobs[t].b = b;
        jobs[t].begin = n * (size_t)t / (size_t)nthreads;
        jobs[t].end = n * (size_t)(t + 1) / (size_t)nthreads;
    }
    for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&tids[t], NULL, fn, &jobs[t]) == 0;
    fn(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t])
            pthread_join(tids[t], NULL);
        else
            fn(&jobs[t]);
    }
    return 0;
}

int64_t encfs_decrypt_chunks(const uint8_t *key, const uint8_t *base_nonce, uint64_t first_index,
                             const uint8_t *ct, size_t ct_len, uint8_t *out, size_t out_cap,
                             int nthreads, int64_t *failed_index) {
    if (failed_index) *failed_index = -1;
    if (key == NULL || base_nonce == NULL || (ct_len && (ct == NULL))) return ENCFS_E_ARG;
    size_t full = ct_len / ENCFS_CT_CHUNK_SIZE, last = ct_len % ENCFS_CT_CHUNK_SIZE;
    if (last && last < ENCFS_TAG_SIZE) return ENCFS_E_FORMAT;
    size_t nchunks = full + (last ? 1 : 0);
    size_t total = full * ENCFS_CHUNK_SIZE + (last ? last - ENCFS_TAG_SIZE : 0);
    if (first_index > ENCFS_MAX_CHUNKS || nchunks > ENCFS_MAX_CHUNKS - first_index) return ENCFS_E_RANGE;
    if (out_cap < total || (total && out == NULL)) return ENCFS_E_SPACE;
    if (overlaps(ct, ct_len, out, total)) return ENCFS_E_OVERLAP;
    if (nchunks == 0) return 0;
    const EVP_CIPHER *cipher = aes256gcm();
    if (cipher == NULL) return ENCFS_E_CRYPTO;

    int64_t lowest_fail = INT64_MAX;
    int crypto_error = 0;
    batch_t b = {cipher, key, base_nonce, first_index, ct, ct_len, out, nchunks, 0, &lowest_fail, &crypto_error};
    run_batch(&b, nthreads, decrypt_run);
    if (crypto_error) {
        OPENSSL_cleanse(out, total);
        return ENCFS_E_CRYPTO;
    }
    if (lowest_fail != INT64_MAX) {
        size_t from = (size_t)lowest_fail * ENCFS_CHUNK_SIZE;
        OPENSSL_cleanse(out + from, total - from);
        if (failed_index) *failed_index = (int64_t)(first_index + (uint64_t)lowest_fail);
        return ENCFS_E_AUTH;
    }
    return (int64_t)total;
}

int64_t encfs_encrypt_chunks(const uint8_t *key, const uint8_t *base_nonce, uint64_t first_index,
                             const uint8_t *pt, size_t pt_len, int final, uint8_t *out,
                             size_t out_cap, int nthreads) {
    if (key == NULL || base_nonce == NULL || (pt_len && pt == NULL)) return ENCFS_E_ARG;
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
    const EVP_CIPHER *cipher = aes256gcm();
    if (cipher == NULL) return ENCFS_E_CRYPTO;

    int crypto_error = 0;
    batch_t b = {cipher, key, base_nonce, first_index, pt, pt_len, out, nchunks, final != 0, NULL, &crypto_error};
    run_batch(&b, nthreads, encrypt_run);
    if (crypto_error) {
        OPENSSL_cleanse(out, total);
        return ENCFS_E_CRYPTO;
    }
    return (int64_t)total;
}

static int64_t gcm_check(const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                         const uint8_t *aad, size_t aad_len, const void *in, size_t in_len) {
    if (key == NULL || iv == NULL || key_len != ENCFS_KEY_SIZE || iv_len != ENCFS_NONCE_SIZE) return ENCFS_E_ARG;
    if ((aad_len && aad == NULL) || (in_len && in == NULL)) return ENCFS_E_ARG;
    if (aad_len > INT_MAX || in_len > INT_MAX) return ENCFS_E_ARG;
    return aes256gcm() == NULL ? ENCFS_E_CRYPTO : 0;
}

int64_t encfs_gcm_seal(const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                       const uint8_t *aad, size_t aad_len, const uint8_t *pt, size_t pt_len,
                       uint8_t *out, size_t out_cap) {
    int64_t rc = gcm_check(key, key_len, iv, iv_len, aad, aad_len, pt, pt_len);
    if (rc) return rc;
    if (out == NULL || out_cap < pt_len + ENCFS_TAG_SIZE) return ENCFS_E_SPACE;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int outl = 0, finl = 0;
    rc = ENCFS_E_CRYPTO;
    if (ctx && EVP_EncryptInit_ex2(ctx, aes256gcm(), key, iv, NULL) == 1 &&
        (!aad_len || EVP_EncryptUpdate(ctx, NULL, &outl, aad, (int)aad_len) == 1) &&
        (!pt_len || EVP_EncryptUpdate(ctx, out, &outl, pt, (int)pt_len) == 1) &&
        EVP_EncryptFinal_ex(ctx, out + outl, &finl) == 1 &&
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, ENCFS_TAG_SIZE, out + pt_len) == 1)
        rc = (int64_t)(pt_len + ENCFS_TAG_SIZE);
    else
        OPENSSL_cleanse(out, pt_len + ENCFS_TAG_SIZE);
    EVP_CIPHER_CTX_free(ctx);
    return rc;
}

int64_t encfs_gcm_open(const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                       const uint8_t *aad, size_t aad_len, const uint8_t *ct, size_t ct_len,
                       uint8_t *out, size_t out_cap) {
    int64_t rc = gcm_check(key, key_len, iv, iv_len, aad, aad_len, ct, ct_len);
    if (rc) return rc;
    if (ct_len < ENCFS_TAG_SIZE) return ENCFS_E_FORMAT;
    size_t pt_len = ct_len - ENCFS_TAG_SIZE;
    if (out_cap < pt_len || (pt_len && out == NULL)) return ENCFS_E_SPACE;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int outl = 0, finl = 0;
    uint8_t spare[1];
    uint8_t *dst = pt_len ? out : spare;
    if (ctx && EVP_DecryptInit_ex2(ctx, aes256gcm(), key, iv, NULL) == 1 &&
        (!aad_len || EVP_DecryptUpdate(ctx, NULL, &outl, aad, (int)aad_len) == 1) &&
        (!pt_len || EVP_DecryptUpdate(ctx, dst, &outl, ct, (int)pt_len) == 1) &&
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, ENCFS_TAG_SIZE, (void *)(ct + pt_len)) == 1) {
        rc = EVP_DecryptFinal_ex(ctx, dst + outl, &finl) == 1 ? (int64_t)pt_len : ENCFS_E_AUTH;
    } else {
        rc = ENCFS_E_CRYPTO;
    }
    if (rc < 0 && pt_len) OPENSSL_cleanse(out, pt_len);
    EVP_CIPHER_CTX_free(ctx);
    return rc;
}

/* ---- secure memory ---- */

static uint64_t mlock_fallbacks;
static uint64_t locked_bytes;

static size_t page_round(size_t n) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return (n + page - 1) / page * page;
}

int encfs_secure_lock(void *p, size_t n) {
    if (p == NULL || n == 0) return 0;
#ifdef MADV_DONTDUMP
    (void)madvise(p, page_round(n), MADV_DONTDUMP);
#endif
    if (mlock(p, n) != 0) {
        __atomic_add_fetch(&mlock_fallbacks, 1, __ATOMIC_RELAXED);
        return 0;
    }
    __atomic_add_fetch(&locked_bytes, page_round(n), __ATOMIC_RELAXED);
    return 1;
}

void encfs_secure_unlock(void *p, size_t n, int locked) {
    if (p == NULL || n == 0) return;
    OPENSSL_cleanse(p, n);
    if (locked && munlock(p, n) == 0) __atomic_sub_fetch(&locked_bytes, page_round(n), __ATOMIC_RELAXED);
}

void *encfs_secure_alloc(size_t n, int *locked) {
    if (locked) *locked = 0;
    if (n == 0) return NULL;
    size_t len = page_round(n);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    int ok = encfs_secure_lock(p, len);
    if (locked) *locked = ok;
    return p;
}

void encfs_secure_free(void *p, size_t n, int locked) {
    if (p == NULL || n == 0) return;
    size_t len = page_round(n);
    encfs_secure_unlock(p, len, locked);
    munmap(p, len);
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
