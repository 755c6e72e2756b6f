/* The AES-256-GCM layer under the chunk functions: one key schedule type and one per-thread
 * context type over two implementations, Intel IPsec-MB's direct GCM API (when the build has
 * it, ENCFS_HAVE_IPSEC_MB, and the CPU has AES-NI and PCLMULQDQ) and OpenSSL 3 EVP. Both give
 * the same bytes. Internal to the native library: Python sees encfs_native.h only. */
#ifndef ENCFS_AES_H
#define ENCFS_AES_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

#ifdef ENCFS_HAVE_IPSEC_MB
#include <intel-ipsec-mb.h>
#endif

#define AES_KEY_MAGIC 0x65616573u /* "eaes": an initialised schedule */

/* A key expanded once per file key and then shared read-only by every thread: IPsec-MB's
 * round keys and GHASH powers, or the raw key (OpenSSL keys a context per thread from it). */
typedef struct {
#ifdef ENCFS_HAVE_IPSEC_MB
    _Alignas(64) struct gcm_key_data gkd;
#endif
    uint8_t raw[32];
    int impl;       /* ENCFS_AES_OPENSSL or ENCFS_AES_IPSEC_MB */
    int arch;       /* IPsec-MB: the arch whose precompute filled gkd */
    uint32_t magic; /* AES_KEY_MAGIC */
} aes_key_t;

/* One thread's working state for one key (never shared between threads). */
typedef struct {
    EVP_CIPHER_CTX *evp; /* OpenSSL: keyed on first use */
    int enc;             /* the direction evp was keyed for */
#ifdef ENCFS_HAVE_IPSEC_MB
    struct gcm_context_data gctx;
#endif
} aes_ctx_t;

/* 1 when impl (ENCFS_AES_*) can run here: built in and supported by the CPU. */
int aes_available(int impl);
/* The implementation ENCFS_AES_AUTO stands for: IPsec-MB when available, else OpenSSL. */
int aes_resolve(int impl);
/* Expand key for impl (AUTO resolved); the implementation used, or a negative ENCFS_E_*. */
int aes_key_init(aes_key_t *k, const uint8_t key[32], int impl);
/* 1 when k was filled by aes_key_init and can run in this process. */
int aes_key_ok(const aes_key_t *k);
void aes_key_wipe(aes_key_t *k);
/* "ipsec-mb 1.3.0 avx ..." or "OpenSSL 3.0.x EVP"; NULL for an unknown impl. */
const char *aes_describe(int impl);

/* Open len bytes of in into out (which must not overlap in) under iv/aad and check tag in
 * constant time. 1: verified; 0: the tag did not verify (out then holds unverified bytes the
 * caller must not release); -1: the library refused. */
int aes_open(aes_ctx_t *c, const aes_key_t *k, const uint8_t iv[12], const uint8_t *aad, size_t aad_len,
             const uint8_t *in, size_t len, const uint8_t tag[16], uint8_t *out);
/* Seal len bytes of in into out and write the 16-byte tag; 1, or -1 when the library refused. */
int aes_seal(aes_ctx_t *c, const aes_key_t *k, const uint8_t iv[12], const uint8_t *aad, size_t aad_len,
             const uint8_t *in, size_t len, uint8_t *out, uint8_t tag[16]);
/* Free and cleanse a context. */
void aes_ctx_done(aes_ctx_t *c);

#endif
