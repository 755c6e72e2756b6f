/* Standalone driver of the native library's AES layer for the sanitizer test
 * (tests/test_aes_impls.py builds it with ASan + UBSan together with the native C files).
 *
 * Reads a vector file, one case a line, fields in hex ("-" for empty):
 *   G key iv aad msg ct tag valid     one AES-256-GCM message (Wycheproof)
 *   S key base_nonce first msg ct     a Cobblestone chunk span (final chunk included)
 * and runs each through every AES implementation the build can run, then multi-chunk round
 * trips across implementations with tampered chunks, from memory and from a file. Prints
 * "harness: N checks, 0 failures" and exits 0 when every check held. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "encfs_native.h"

static int checks, failures;

#define CHECK(cond, ...)                                      \
    do {                                                      \
        checks++;                                             \
        if (!(cond)) {                                        \
            failures++;                                       \
            fprintf(stderr, "FAIL line %d: ", __LINE__);      \
            fprintf(stderr, __VA_ARGS__);                     \
            fputc('\n', stderr);                              \
        }                                                     \
    } while (0)

static const int IMPLS[2] = {ENCFS_AES_OPENSSL, ENCFS_AES_IPSEC_MB};

/* Hex to a fresh buffer of exactly *n bytes (malloc'd at that size, so ASan sees overruns). */
static uint8_t *unhex(const char *s, size_t *n) {
    size_t len = strcmp(s, "-") == 0 ? 0 : strlen(s) / 2;
    uint8_t *out = malloc(len ? len : 1);
    for (size_t i = 0; i < len; i++) sscanf(s + 2 * i, "%2hhx", &out[i]);
    *n = len;
    return out;
}

static int all_zero(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) return 0;
    return 1;
}

/* A key schedule in a buffer of exactly encfs_aes_key_size() bytes at an odd address. */
static void *schedule(const uint8_t *key, int impl, uint8_t **block) {
    *block = malloc(encfs_aes_key_size() + 1);
    void *ks = *block + 1;
    int rc = encfs_aes_key_init(ks, key, impl);
    CHECK(rc == impl, "key init for impl %d returned %d", impl, rc);
    CHECK(encfs_aes_key_impl(ks) == impl, "schedule names impl %d", impl);
    return ks;
}

static void message_case(char **f) {
    size_t kl, il, al, ml, cl, tl;
    uint8_t *key = unhex(f[1], &kl), *iv = unhex(f[2], &il), *aad = unhex(f[3], &al), *msg = unhex(f[4], &ml);
    uint8_t *ct = unhex(f[5], &cl), *tag = unhex(f[6], &tl);
    int valid = strcmp(f[7], "1") == 0;
    uint8_t *cttag = malloc(cl + tl), *out = malloc(ml + tl);
    memcpy(cttag, ct, cl);
    memcpy(cttag + cl, tag, tl);
    for (int i = 0; i < 2; i++) {
        if (!encfs_aes_available(IMPLS[i])) continue;
        memset(out, 0xAA, ml + tl);
        int64_t rc = encfs_gcm_open_impl(IMPLS[i], key, kl, iv, il, aad, al, cttag, cl + tl, out, ml);
        if (valid) {
            CHECK(rc == (int64_t)ml && memcmp(out, msg, ml) == 0, "impl %d: valid message did not open (rc %lld)", IMPLS[i], (long long)rc);
            rc = encfs_gcm_seal_impl(IMPLS[i], key, kl, iv, il, aad, al, msg, ml, out, ml + tl);
            CHECK(rc == (int64_t)(ml + tl) && memcmp(out, cttag, ml + tl) == 0, "impl %d: seal differs", IMPLS[i]);
        } else {
            CHECK(rc == ENCFS_E_AUTH && all_zero(out, ml), "impl %d: invalid message opened (rc %lld)", IMPLS[i], (long long)rc);
        }
    }
    free(key), free(iv), free(aad), free(msg), free(ct), free(tag), free(cttag), free(out);
}

static void span_case(char **f) {
    size_t kl, nl, ml, cl;
    uint8_t *key = unhex(f[1], &kl), *nonce = unhex(f[2], &nl), *msg = unhex(f[4], &ml), *ct = unhex(f[5], &cl);
    uint64_t first = strtoull(f[3], NULL, 10);
    uint8_t *out = malloc(cl), *back = malloc(ml ? ml : 1);
    for (int i = 0; i < 2; i++) {
        if (!encfs_aes_available(IMPLS[i])) continue;
        uint8_t *block;
        void *ks = schedule(key, IMPLS[i], &block);
        int64_t rc = encfs_encrypt_chunks_ks(ks, nonce, first, msg, ml, 1, out, cl, 2);
        CHECK(rc == (int64_t)cl && memcmp(out, ct, cl) == 0, "impl %d: span seal differs (rc %lld)", IMPLS[i], (long long)rc);
        int64_t failed;
        rc = encfs_decrypt_chunks_ks(ks, nonce, first, ct, cl, back, ml, 2, &failed);
        CHECK(rc == (int64_t)ml && memcmp(back, msg, ml) == 0, "impl %d: span open differs (rc %lld)", IMPLS[i], (long long)rc);
        free(block);
    }
    free(key), free(nonce), free(msg), free(ct), free(out), free(back);
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static void fill(uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        p[i] = (uint8_t)rng;
    }
}

/* Seal with impl a, open with impl b: a clean round trip, then a chunk tampered in the middle
 * of the batch, from memory and from a file (and that file cut short). */
static void cross_case(int a, int b, size_t nchunks, size_t bad) {
    const uint64_t first = 1000;
    size_t pt_len = (nchunks - 1) * ENCFS_CHUNK_SIZE + 100;
    size_t ct_len = pt_len + nchunks * ENCFS_TAG_SIZE;
    uint8_t key[32], nonce[12], *pt = malloc(pt_len), *ct = malloc(ct_len), *out = malloc(pt_len);
    fill(key, 32), fill(nonce, 12), fill(pt, pt_len);
    uint8_t *ba, *bb;
    void *ka = schedule(key, a, &ba), *kb = schedule(key, b, &bb);
    CHECK(encfs_encrypt_chunks_ks(ka, nonce, first, pt, pt_len, 1, ct, ct_len, 2) == (int64_t)ct_len, "seal %d", a);
    int64_t failed = 0;
    CHECK(encfs_decrypt_chunks_ks(kb, nonce, first, ct, ct_len, out, pt_len, 2, &failed) == (int64_t)pt_len &&
              memcmp(out, pt, pt_len) == 0,
          "%d -> %d round trip", a, b);
    ct[bad * ENCFS_CT_CHUNK_SIZE + 77] ^= 0x10;
    memset(out, 0xAA, pt_len);
    int64_t rc = encfs_decrypt_chunks_ks(kb, nonce, first, ct, ct_len, out, pt_len, 2, &failed);
    size_t keep = bad * ENCFS_CHUNK_SIZE;
    CHECK(rc == ENCFS_E_AUTH && failed == (int64_t)(first + bad), "%d -> %d tamper: rc %lld failed %lld", a, b, (long long)rc,
          (long long)failed);
    CHECK(memcmp(out, pt, keep) == 0 && all_zero(out + keep, pt_len - keep), "%d -> %d tamper: output not zeroed from chunk %zu", a,
          b, bad);

    FILE *tmp = tmpfile();
    CHECK(tmp != NULL, "tmpfile");
    if (tmp) {
        int fd = fileno(tmp);
        CHECK(pwrite(fd, "head", 4, 0) == 4 && pwrite(fd, ct, ct_len, 4) == (ssize_t)ct_len, "write file");
        int err = 0;
        memset(out, 0xAA, pt_len);
        rc = encfs_pread_decrypt_chunks_ks(fd, 4, kb, nonce, first, ct_len, out, pt_len, 2, &failed, &err);
        CHECK(rc == ENCFS_E_AUTH && failed == (int64_t)(first + bad) && memcmp(out, pt, keep) == 0 &&
                  all_zero(out + keep, pt_len - keep),
              "%d -> %d pread tamper: rc %lld failed %lld", a, b, (long long)rc, (long long)failed);
        ct[bad * ENCFS_CT_CHUNK_SIZE + 77] ^= 0x10; /* intact again, but the file cut short */
        CHECK(pwrite(fd, ct, ct_len, 4) == (ssize_t)ct_len && ftruncate(fd, 4 + (off_t)ct_len - 1000) == 0, "truncate");
        memset(out, 0xAA, pt_len);
        rc = encfs_pread_decrypt_chunks_ks(fd, 4, kb, nonce, first, ct_len, out, pt_len, 2, &failed, &err);
        CHECK(rc == ENCFS_E_TRUNCATED && all_zero(out, pt_len), "%d -> %d truncated file: rc %lld", a, b, (long long)rc);
        fclose(tmp);
    }
    free(pt), free(ct), free(out), free(ba), free(bb);
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    FILE *f = fopen(argv[1], "r");
    if (f == NULL) return 2;
    char *line = NULL;
    size_t cap = 0;
    int messages = 0, spans = 0;
    while (getline(&line, &cap, f) > 0) {
        char *fields[8] = {0};
        int n = 0;
        for (char *tok = strtok(line, " \n"); tok && n < 8; tok = strtok(NULL, " \n")) fields[n++] = tok;
        if (n == 8 && fields[0][0] == 'G') message_case(fields), messages++;
        else if (n == 6 && fields[0][0] == 'S') span_case(fields), spans++;
    }
    free(line);
    fclose(f);
    CHECK(messages > 0 && spans > 0, "no vectors read");
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++)
            if (encfs_aes_available(IMPLS[a]) && encfs_aes_available(IMPLS[b])) {
                cross_case(IMPLS[a], IMPLS[b], 37, 20);
                cross_case(IMPLS[a], IMPLS[b], 9, 0);
                cross_case(IMPLS[a], IMPLS[b], 9, 8);
            }
    printf("harness: %d messages, %d spans, impls %s%s, %d checks, %d failures\n", messages, spans,
           encfs_aes_available(ENCFS_AES_OPENSSL) ? "openssl " : "", encfs_aes_available(ENCFS_AES_IPSEC_MB) ? "ipsec-mb" : "",
           checks, failures);
    return failures != 0;
}
