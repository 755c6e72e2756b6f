/* encfs native core: Cobblestone-256 chunk batches over OpenSSL 3 EVP AES-256-GCM, and
 * page-locked secure memory. No function here prints or logs key bytes. */
#ifndef ENCFS_NATIVE_H
#define ENCFS_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#define ENCFS_KEY_SIZE 32
#define ENCFS_NONCE_SIZE 12
#define ENCFS_TAG_SIZE 16
#define ENCFS_CHUNK_SIZE 16384
#define ENCFS_CT_CHUNK_SIZE 16400
#define ENCFS_MAX_CHUNKS 274877906944ULL /* 2^38 */
#define ENCFS_MAX_THREADS 256

/* Error codes (all negative). */
#define ENCFS_E_ARG (-1)    /* NULL pointer or unsupported key/iv size */
#define ENCFS_E_FORMAT (-2) /* last ciphertext piece shorter than a tag; non-final plaintext not whole chunks */
#define ENCFS_E_SPACE (-3)  /* output buffer too small */
#define ENCFS_E_AUTH (-4)   /* a tag did not verify */
#define ENCFS_E_RANGE (-5)  /* chunk index reaches 2^38 */
#define ENCFS_E_CRYPTO (-6) /* OpenSSL refused an operation */
#define ENCFS_E_OVERLAP (-8) /* input and output buffers overlap */
#define ENCFS_E_IO (-9)      /* a read failed; *os_error holds errno */
#define ENCFS_E_TRUNCATED (-10) /* the file ended inside the span */

/* Open the chunks first_index.. cut from ct at 16400-byte steps (the last may be shorter,
 * but at least a tag) into out. Returns plaintext bytes written. Each chunk is opened in the
 * thread's own scratch and copied to out only once its tag verified: out never holds a byte
 * of a chunk that failed, not even while the call runs. On ENCFS_E_AUTH,
 * *failed_index is the lowest failing chunk index and out is zeroed from that chunk's
 * plaintext offset to the end of the span. Up to nthreads threads take part: the caller's and
 * helpers from a pool started on first use (one per process; rebuilt in a child after fork). */
int64_t encfs_decrypt_chunks(const uint8_t *key, const uint8_t *base_nonce, uint64_t first_index,
                             const uint8_t *ct, size_t ct_len, uint8_t *out, size_t out_cap,
                             int nthreads, int64_t *failed_index);

/* The same, reading the span's ciphertext (ct_len bytes at file offset `offset` of fd) with
 * preadv straight into out (tags aside), then opening each chunk of the group from there into
 * scratch and copying it back once verified, while it is in cache (out holds ciphertext, never
 * unverified plaintext). On ENCFS_E_IO (*os_error = errno) or ENCFS_E_TRUNCATED all of out's span is
 * zeroed; on ENCFS_E_AUTH, as above. fd's file offset does not move. */
int64_t encfs_pread_decrypt_chunks(int fd, int64_t offset, const uint8_t *key, const uint8_t *base_nonce,
                                   uint64_t first_index, size_t ct_len, uint8_t *out, size_t out_cap,
                                   int nthreads, int64_t *failed_index, int *os_error);

/* Seal pt as chunks first_index.. into out. With final != 0 the last piece (short, maybe
 * empty) is the final chunk; otherwise pt_len must be a multiple of 16384. Returns
 * ciphertext bytes written. */
int64_t encfs_encrypt_chunks(const uint8_t *key, const uint8_t *base_nonce, uint64_t first_index,
                             const uint8_t *pt, size_t pt_len, int final, uint8_t *out,
                             size_t out_cap, int nthreads);

/* Single-shot AES-256-GCM (32-byte key, 12-byte iv, 16-byte tag). seal writes ct||tag
 * (pt_len + 16 bytes); open takes ct||tag and writes the plaintext, zeroing it on failure.
 * encfs seals and opens files through the chunk functions above; these two are the same
 * OpenSSL calls with AAD, checked against Wycheproof by the tests (tests/native_helpers.py),
 * and give the benchmarks the one-message EVP limit (benchmarks/bench_throughput.py). */
int64_t encfs_gcm_seal(const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                       const uint8_t *aad, size_t aad_len, const uint8_t *pt, size_t pt_len,
                       uint8_t *out, size_t out_cap);
int64_t encfs_gcm_open(const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                       const uint8_t *aad, size_t aad_len, const uint8_t *ct, size_t ct_len,
                       uint8_t *out, size_t out_cap);

/* Secure memory, on pages the caller mapped (encfs.securemem's SecureBuffer; p page-aligned).
 * exclude_from_dumps marks them MADV_DONTDUMP: the one place the native code does (the
 * per-thread scratch included). lock excludes them from dumps and locks them: 1 when locked;
 * 0 when mlock failed, and the fallback counter goes up (the pages are used unlocked). */
void encfs_exclude_from_dumps(void *p, size_t n);
int encfs_secure_lock(void *p, size_t n);
/* Lock again pages whose lock was lost (a child after fork: mlock is not inherited) and that
 * the locked-bytes count still holds: 1 when locked; on failure they leave the count and the
 * fallback counter goes up. */
int encfs_secure_relock(void *p, size_t n);
/* Cleanse n bytes, then unlock them when they were locked (locked != 0). */
void encfs_secure_wipe_unlock(void *p, size_t n, int locked);
void encfs_cleanse(void *p, size_t n);
uint64_t encfs_mlock_fallbacks(void);
uint64_t encfs_locked_bytes(void);
int encfs_mlock_probe(void);

const char *encfs_openssl_version(void);

#endif
