/* AES-256-GCM over Intel IPsec-MB's direct GCM API or OpenSSL 3 EVP (see encfs_aes.h).
 *
 * IPsec-MB: one manager is set up once per process only to pick the code for this CPU; its
 * precompute, encrypt and decrypt function pointers are kept and the manager is freed. Those
 * functions take the expanded key read-only and a caller-owned gcm_context_data, and touch no
 * state of the manager, so every thread calls them with its own context and the shared key.
 * Among the archs the CPU supports below AVX-512 (SSE, AVX, AVX2) a short start-up timing
 * picks the fastest: on some CPUs without AVX-512 (AMD Zen 3) the AVX code beats the AVX2
 * code that init_mb_mgr_auto picks. IPsec-MB computes the tag without comparing it: the
 * comparison here is CRYPTO_memcmp, and the computed tag is cleansed either way. */
#define _GNU_SOURCE
#include "encfs_aes.h"

#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>

#include "encfs_native.h"

/* ---- OpenSSL ---- */

static EVP_CIPHER *gcm_cipher;
static pthread_once_t gcm_once = PTHREAD_ONCE_INIT;
static char openssl_desc[96];

static void fetch_gcm(void) {
    gcm_cipher = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    snprintf(openssl_desc, sizeof openssl_desc, "openssl %s EVP", OpenSSL_version(OPENSSL_VERSION_STRING));
}

static const EVP_CIPHER *aes256gcm(void) {
    pthread_once(&gcm_once, fetch_gcm);
    return gcm_cipher;
}

/* c->evp keyed for direction enc; 0 when OpenSSL refused. */
static int evp_ready(aes_ctx_t *c, const aes_key_t *k, int enc) {
    if (c->evp && c->enc == enc) return 1;
    const EVP_CIPHER *cipher = aes256gcm();
    if (cipher == NULL) return 0;
    if (c->evp == NULL && (c->evp = EVP_CIPHER_CTX_new()) == NULL) return 0;
    c->enc = enc;
    return EVP_CipherInit_ex2(c->evp, cipher, k->raw, NULL, enc, NULL) == 1;
}

static int evp_open(aes_ctx_t *c, const aes_key_t *k, const uint8_t iv[12], const uint8_t *aad, size_t aad_len,
                    const uint8_t *in, size_t len, const uint8_t tag[16], uint8_t *out) {
    int outl = 0, finl = 0;
    if (!evp_ready(c, k, 0) || EVP_DecryptInit_ex2(c->evp, NULL, NULL, iv, NULL) != 1 ||
        (aad_len && EVP_DecryptUpdate(c->evp, NULL, &outl, aad, (int)aad_len) != 1) ||
        (len && EVP_DecryptUpdate(c->evp, out, &outl, in, (int)len) != 1) ||
        EVP_CIPHER_CTX_ctrl(c->evp, EVP_CTRL_GCM_SET_TAG, ENCFS_TAG_SIZE, (void *)tag) != 1)
        return -1;
    return EVP_DecryptFinal_ex(c->evp, out + outl, &finl) == 1;
}

static int evp_seal(aes_ctx_t *c, const aes_key_t *k, const uint8_t iv[12], const uint8_t *aad, size_t aad_len,
                    const uint8_t *in, size_t len, uint8_t *out, uint8_t tag[16]) {
    int outl = 0, finl = 0;
    if (!evp_ready(c, k, 1) || EVP_EncryptInit_ex2(c->evp, NULL, NULL, iv, NULL) != 1 ||
        (aad_len && EVP_EncryptUpdate(c->evp, NULL, &outl, aad, (int)aad_len) != 1) ||
        (len && EVP_EncryptUpdate(c->evp, out, &outl, in, (int)len) != 1) ||
        EVP_EncryptFinal_ex(c->evp, out + outl, &finl) != 1 ||
        EVP_CIPHER_CTX_ctrl(c->evp, EVP_CTRL_GCM_GET_TAG, ENCFS_TAG_SIZE, tag) != 1)
        return -1;
    return 1;
}

/* ---- IPsec-MB ---- */

#ifdef ENCFS_HAVE_IPSEC_MB

typedef struct {
    aes_gcm_pre_t pre;
    aes_gcm_enc_dec_t enc, dec;
    int arch;
} imb_ops_t;

static imb_ops_t imb;     /* the chosen code; imb.arch == 0: IPsec-MB not usable here */
static char imb_desc[160];
static pthread_once_t imb_once = PTHREAD_ONCE_INIT;

static const char *arch_name(int arch) {
    switch (arch) {
    case IMB_ARCH_SSE: return "sse";
    case IMB_ARCH_AVX: return "avx";
    case IMB_ARCH_AVX2: return "avx2";
    case IMB_ARCH_AVX512: return "avx512";
    default: return "none";
    }
}

static int arch_fits(uint64_t features, int arch) {
    uint64_t need = arch == IMB_ARCH_SSE ? IMB_CPUFLAGS_SSE
                  : arch == IMB_ARCH_AVX ? IMB_CPUFLAGS_AVX
                  : arch == IMB_ARCH_AVX2 ? IMB_CPUFLAGS_AVX2
                                          : UINT64_MAX;
    return (features & need) == need;
}

/* The manager's GCM-256 code for arch; 0 when IPsec-MB refused to set it up. */
static int ops_for(IMB_MGR *m, int arch, imb_ops_t *out) {
    switch (arch) {
    case IMB_ARCH_SSE: init_mb_mgr_sse(m); break;
    case IMB_ARCH_AVX: init_mb_mgr_avx(m); break;
    case IMB_ARCH_AVX2: init_mb_mgr_avx2(m); break;
    default: return 0;
    }
    if (imb_get_errno(m) != 0 || m->gcm256_pre == NULL || m->gcm256_dec == NULL || m->gcm256_enc == NULL) return 0;
    *out = (imb_ops_t){m->gcm256_pre, m->gcm256_enc, m->gcm256_dec, arch};
    return 1;
}

static uint64_t clock_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#define CAL_ROUNDS 7
#define CAL_CHUNKS 4
#define CAL_MARGIN 1.03 /* another arch must beat the default by 3% to be picked */

/* Best time of CAL_ROUNDS, each CAL_CHUNKS 16 KiB decrypts of a dummy key's data. */
static uint64_t time_ops(const imb_ops_t *o, const struct gcm_key_data *gkd, uint8_t *buf, uint8_t *dst) {
    struct gcm_context_data ctx;
    uint8_t iv[ENCFS_NONCE_SIZE] = {0}, tag[ENCFS_TAG_SIZE];
    uint64_t best = UINT64_MAX;
    for (int r = 0; r < CAL_ROUNDS; r++) {
        uint64_t t0 = clock_ns();
        for (int i = 0; i < CAL_CHUNKS; i++) o->dec(gkd, &ctx, dst, buf, ENCFS_CHUNK_SIZE, iv, buf, 0, tag, ENCFS_TAG_SIZE);
        uint64_t dt = clock_ns() - t0;
        if (dt < best) best = dt;
    }
    return best;
}

/* Of the candidate archs (in ascending order), the one whose decrypt runs fastest here: from
 * `fallback`, each lower arch in turn replaces the pick only when it beats it by CAL_MARGIN, so
 * near ties keep the newer code and noise rarely changes the choice. */
static int fastest(const imb_ops_t *cand, int n, int fallback) {
    static _Alignas(64) uint8_t buf[ENCFS_CHUNK_SIZE], dst[ENCFS_CHUNK_SIZE];
    static const uint8_t zero_key[ENCFS_KEY_SIZE];
    _Alignas(64) struct gcm_key_data gkd[3];
    uint64_t t[3];
    for (int i = 0; i < n; i++) {
        cand[i].pre(zero_key, &gkd[i]);
        (void)time_ops(&cand[i], &gkd[i], buf, dst); /* warm up */
    }
    for (int i = 0; i < n; i++) t[i] = time_ops(&cand[i], &gkd[i], buf, dst);
    int pick = fallback;
    uint64_t pick_t = t[fallback];
    for (int i = fallback - 1; i >= 0; i--)
        if ((double)t[i] * CAL_MARGIN < (double)pick_t) pick = i, pick_t = t[i];
    return pick;
}

static void setup_imb(void) {
    IMB_MGR *m = alloc_mb_mgr(0);
    if (m == NULL) return;
    IMB_ARCH auto_arch = IMB_ARCH_NONE;
    init_mb_mgr_auto(m, &auto_arch);
    uint64_t features = m->features;
    int ok = imb_get_errno(m) == 0 && auto_arch >= IMB_ARCH_SSE && (features & IMB_FEATURE_AESNI) &&
             (features & IMB_FEATURE_PCLMULQDQ);
    if (ok && auto_arch == IMB_ARCH_AVX512) {
        imb = (imb_ops_t){m->gcm256_pre, m->gcm256_enc, m->gcm256_dec, IMB_ARCH_AVX512};
        snprintf(imb_desc, sizeof imb_desc, "ipsec-mb %s avx512%s", imb_get_version_str(),
                 (features & IMB_FEATURE_VAES) ? "/vaes" : "");
    } else if (ok) {
        imb_ops_t cand[3];
        int n = 0, dflt = 0;
        const int archs[3] = {IMB_ARCH_SSE, IMB_ARCH_AVX, IMB_ARCH_AVX2};
        for (int i = 0; i < 3; i++)
            if (archs[i] <= (int)auto_arch && arch_fits(features, archs[i]) && ops_for(m, archs[i], &cand[n])) {
                if (archs[i] == (int)auto_arch) dflt = n;
                n++;
            }
        if (n > 0) {
            int pick = n > 1 ? fastest(cand, n, dflt) : 0;
            imb = cand[pick];
            snprintf(imb_desc, sizeof imb_desc, "ipsec-mb %s %s (init_mb_mgr_auto: %s%s)", imb_get_version_str(),
                     arch_name(imb.arch), arch_name((int)auto_arch), n > 1 ? "; fastest by start-up timing" : "");
        }
    }
    free_mb_mgr(m);
}

static const imb_ops_t *imb_ops(void) {
    pthread_once(&imb_once, setup_imb);
    return imb.arch ? &imb : NULL;
}

static const uint8_t no_aad[1];

static int imb_open(aes_ctx_t *c, const aes_key_t *k, const uint8_t iv[12], const uint8_t *aad, size_t aad_len,
                    const uint8_t *in, size_t len, const uint8_t tag[16], uint8_t *out) {
    uint8_t got[ENCFS_TAG_SIZE];
    for (int i = 0; i < ENCFS_TAG_SIZE; i++) got[i] = (uint8_t)~tag[i]; /* a call that wrote nothing fails */
    imb.dec(&k->gkd, &c->gctx, out, in, len, iv, aad_len ? aad : no_aad, aad_len, got, ENCFS_TAG_SIZE);
    int ok = CRYPTO_memcmp(got, tag, ENCFS_TAG_SIZE) == 0;
    OPENSSL_cleanse(got, sizeof got);
    return ok;
}

static int imb_seal(aes_ctx_t *c, const aes_key_t *k, const uint8_t iv[12], const uint8_t *aad, size_t aad_len,
                    const uint8_t *in, size_t len, uint8_t *out, uint8_t tag[16]) {
    imb.enc(&k->gkd, &c->gctx, out, in, len, iv, aad_len ? aad : no_aad, aad_len, tag, ENCFS_TAG_SIZE);
    return 1;
}

#endif /* ENCFS_HAVE_IPSEC_MB */

/* ---- the common face ---- */

int aes_available(int impl) {
    switch (impl) {
    case ENCFS_AES_OPENSSL: return aes256gcm() != NULL;
#ifdef ENCFS_HAVE_IPSEC_MB
    case ENCFS_AES_IPSEC_MB: return imb_ops() != NULL;
#endif
    case ENCFS_AES_AUTO: return aes_available(aes_resolve(ENCFS_AES_AUTO));
    default: return 0;
    }
}

int aes_resolve(int impl) {
    if (impl != ENCFS_AES_AUTO) return impl;
    return aes_available(ENCFS_AES_IPSEC_MB) ? ENCFS_AES_IPSEC_MB : ENCFS_AES_OPENSSL;
}

int aes_key_init(aes_key_t *k, const uint8_t key[32], int impl) {
    if (k == NULL || key == NULL) return ENCFS_E_ARG;
    if (impl != ENCFS_AES_AUTO && impl != ENCFS_AES_OPENSSL && impl != ENCFS_AES_IPSEC_MB) return ENCFS_E_ARG;
    impl = aes_resolve(impl);
    if (!aes_available(impl)) return ENCFS_E_UNAVAILABLE;
    OPENSSL_cleanse(k, sizeof *k);
#ifdef ENCFS_HAVE_IPSEC_MB
    if (impl == ENCFS_AES_IPSEC_MB) {
        imb.pre(key, &k->gkd);
        k->arch = imb.arch;
    }
#endif
    if (impl == ENCFS_AES_OPENSSL) memcpy(k->raw, key, sizeof k->raw);
    k->impl = impl;
    k->magic = AES_KEY_MAGIC;
    return impl;
}

int aes_key_ok(const aes_key_t *k) {
    if (k == NULL || k->magic != AES_KEY_MAGIC) return 0;
    if (k->impl == ENCFS_AES_OPENSSL) return aes256gcm() != NULL;
#ifdef ENCFS_HAVE_IPSEC_MB
    if (k->impl == ENCFS_AES_IPSEC_MB) return imb_ops() != NULL && k->arch == imb.arch;
#endif
    return 0;
}

void aes_key_wipe(aes_key_t *k) {
    if (k) OPENSSL_cleanse(k, sizeof *k);
}

const char *aes_describe(int impl) {
    impl = aes_resolve(impl);
    if (!aes_available(impl)) return NULL;
#ifdef ENCFS_HAVE_IPSEC_MB
    if (impl == ENCFS_AES_IPSEC_MB) return imb_desc;
#endif
    return impl == ENCFS_AES_OPENSSL ? openssl_desc : NULL;
}

int aes_open(aes_ctx_t *c, const aes_key_t *k, const uint8_t iv[12], const uint8_t *aad, size_t aad_len,
             const uint8_t *in, size_t len, const uint8_t tag[16], uint8_t *out) {
    uint8_t spare[1];
    if (out == NULL) out = spare;
    if (in == NULL) in = spare;
#ifdef ENCFS_HAVE_IPSEC_MB
    if (k->impl == ENCFS_AES_IPSEC_MB) return imb_open(c, k, iv, aad, aad_len, in, len, tag, out);
#endif
    return evp_open(c, k, iv, aad, aad_len, in, len, tag, out);
}

int aes_seal(aes_ctx_t *c, const aes_key_t *k, const uint8_t iv[12], const uint8_t *aad, size_t aad_len,
             const uint8_t *in, size_t len, uint8_t *out, uint8_t tag[16]) {
    uint8_t spare[1];
    if (out == NULL) out = spare;
    if (in == NULL) in = spare;
#ifdef ENCFS_HAVE_IPSEC_MB
    if (k->impl == ENCFS_AES_IPSEC_MB) return imb_seal(c, k, iv, aad, aad_len, in, len, out, tag);
#endif
    return evp_seal(c, k, iv, aad, aad_len, in, len, out, tag);
}

void aes_ctx_done(aes_ctx_t *c) {
    if (c == NULL) return;
    EVP_CIPHER_CTX_free(c->evp);
    OPENSSL_cleanse(c, sizeof *c);
}
