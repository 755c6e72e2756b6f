/* encfs native core: Cobblestone-256 chunk batches over AES-256-GCM (Intel IPsec-MB where the
 * build has it and the CPU supports it, OpenSSL 3 EVP otherwise; identical bytes), and
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
#define ENCFS_E_UNAVAILABLE (-11) /* the AES implementation asked for is not built in or not usable on this CPU */

/* AES-256-GCM implementations. AUTO: IPsec-MB when available, else OpenSSL. */
#define ENCFS_AES_AUTO 0
#define ENCFS_AES_OPENSSL 1
#define ENCFS_AES_IPSEC_MB 2

/* Key schedules: a file key expanded once (IPsec-MB: round keys and GHASH powers; OpenSSL: the
 * key itself) into caller memory of encfs_aes_key_size() bytes (any alignment; encfs keeps it
 * in locked memory and cleanses it on close). Every thread of a batch reads it, none writes it.
 * init returns the implementation used (ENCFS_AES_OPENSSL or ENCFS_AES_IPSEC_MB) or
 * ENCFS_E_ARG / ENCFS_E_UNAVAILABLE. */
size_t encfs_aes_key_size(void);
int encfs_aes_key_init(void *ks, const uint8_t *key, int impl);
/* The implementation a schedule was made for; ENCFS_E_ARG when ks holds none usable here. */
int encfs_aes_key_impl(const void *ks);
/* 1 when impl can run in this build on this CPU; built: 1 when this build has impl's code. */
int encfs_aes_available(int impl);
int encfs_aes_built(int impl);
/* What impl runs as, e.g. "ipsec-mb 1.3.0 avx (...)" or "openssl 3.0.17 EVP"; "unavailable". */
const char *encfs_aes_describe(int impl);

/* Open the chunks first_index.. cut from ct at 16400-byte steps (the last may be shorter,
 * but at least a tag) into out. Returns plaintext bytes written. Each chunk is opened in the
 * thread's own scratch and copied to out only once its tag verified: out never holds a byte
 * of a chunk that failed, not even while the call runs. On ENCFS_E_AUTH,
 * *failed_index is the lowest failing chunk index and out is zeroed from that chunk's
 * plaintext offset to the end of the span. Up to nthreads threads take part: the caller's and
 * helpers from a pool started on first use (one per process; rebuilt in a child after fork).
 * Each chunk function comes in two forms: _ks takes a schedule from encfs_aes_key_init (what
 * encfs uses); the raw-key form expands key for the one call, ENCFS_AES_AUTO. */
int64_t encfs_decrypt_chunks_ks(const void *ks, const uint8_t *base_nonce, uint64_t first_index,
                                const uint8_t *ct, size_t ct_len, uint8_t *out, size_t out_cap,
                                int nthreads, int64_t *failed_index);
int64_t encfs_decrypt_chunks(const uint8_t *key, const uint8_t *base_nonce, uint64_t first_index,
                             const uint8_t *ct, size_t ct_len, uint8_t *out, size_t out_cap,
                             int nthreads, int64_t *failed_index);

/* The same, reading the span's ciphertext (ct_len bytes at file offset `offset` of fd) with
 * preadv straight into out (tags aside), then opening each chunk of the group from there into
 * scratch and copying it back once verified, while it is in cache (out holds ciphertext, never
 * unverified plaintext). On ENCFS_E_IO (*os_error = errno) or ENCFS_E_TRUNCATED all of out's span is
 * zeroed; on ENCFS_E_AUTH, as above. fd's file offset does not move. */
int64_t encfs_pread_decrypt_chunks_ks(int fd, int64_t offset, const void *ks, const uint8_t *base_nonce,
                                      uint64_t first_index, size_t ct_len, uint8_t *out, size_t out_cap,
                                      int nthreads, int64_t *failed_index, int *os_error);
int64_t encfs_pread_decrypt_chunks(int fd, int64_t offset, const uint8_t *key, const uint8_t *base_nonce,
                                   uint64_t first_index, size_t ct_len, uint8_t *out, size_t out_cap,
                                   int nthreads, int64_t *failed_index, int *os_error);

/* Seal pt as chunks first_index.. into out. With final != 0 the last piece (short, maybe
 * empty) is the final chunk; otherwise pt_len must be a multiple of 16384. Returns
 * ciphertext bytes written. */
int64_t encfs_encrypt_chunks_ks(const void *ks, const uint8_t *base_nonce, uint64_t first_index,
                                const uint8_t *pt, size_t pt_len, int final, uint8_t *out,
                                size_t out_cap, int nthreads);
int64_t encfs_encrypt_chunks(const uint8_t *key, const uint8_t *base_nonce, uint64_t first_index,
                             const uint8_t *pt, size_t pt_len, int final, uint8_t *out,
                             size_t out_cap, int nthreads);

/* Single-shot AES-256-GCM (32-byte key, 12-byte iv, 16-byte tag). seal writes ct||tag
 * (pt_len + 16 bytes); open takes ct||tag and writes the plaintext, zeroing it on failure.
 * encfs seals and opens files through the chunk functions above; these are the same AES calls
 * with AAD, checked against Wycheproof by the tests (tests/native_helpers.py,
 * tests/test_aes_impls.py), and give the benchmarks the one-message limit
 * (benchmarks/bench_throughput.py, bench_aes.py). The _impl forms take ENCFS_AES_*; the plain
 * forms are OpenSSL EVP, as they always were. */
int64_t encfs_gcm_seal_impl(int impl, const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                            const uint8_t *aad, size_t aad_len, const uint8_t *pt, size_t pt_len,
                            uint8_t *out, size_t out_cap);
int64_t encfs_gcm_open_impl(int impl, const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                            const uint8_t *aad, size_t aad_len, const uint8_t *ct, size_t ct_len,
                            uint8_t *out, size_t out_cap);
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
