/*
 * BitNetMCU inference engine: see BitNetMCU_inference.h. Every kernel is stateless; the Python
 * reference in intmodel.py computes exactly the same integers (tests compare them logit by logit).
 */
#include "BitNetMCU_inference.h"
#include "BitNetMCU_lanes.h"

#include <stddef.h>

const int8_t BitNetMCU_nf4_levels[16] = {-127, -88, -67, -50, -36, -23, -12, 0,
                                         10, 20, 31, 43, 56, 71, 92, 127};

/* ------------------------------------------------------------------------------------------------
 * Fully connected layers: the weight types' products, both layouts
 * ------------------------------------------------------------------------------------------------ */

/* The packed types. The generic kernels below are inlined into one function per type with a
 * constant type, so every switch on it folds away: a model links only the code of its own types
 * (and a multiplier-free type never links a multiply). */
#if defined(__GNUC__)
#define SPECIALIZE static inline __attribute__((always_inline))
#define NOINLINE __attribute__((noinline))
#else
#define SPECIALIZE static inline
#define NOINLINE
#endif
#define BITNETMCU_ENUM(name, id, bits) id,
enum qtype { BITNETMCU_FC_TYPES(BITNETMCU_ENUM) };

/* a * 2^k. Shifting a negative signed value left is undefined in C; the unsigned shift is not. */
SPECIALIZE int32_t shl(int32_t a, uint32_t k)
{
    return (int32_t)((uint32_t)a << k);
}

SPECIALIZE uint32_t code_bits(enum qtype t)
{
#define BITNETMCU_CODE_BITS(name, id, bits) \
    case id:                                \
        return bits;
    switch (t) { BITNETMCU_FC_TYPES(BITNETMCU_CODE_BITS) }
    return 0;
}

/* ceil(n / per_word) without a divider (the CH32V00x have none): a shift, or counting for 6 codes a word. */
SPECIALIZE uint32_t whole_words(uint32_t n, uint32_t per_word)
{
    if ((per_word & (per_word - 1u)) == 0u) return (n + per_word - 1u) / per_word;
    uint32_t words = 0;
    for (uint32_t k = 0; k < n; k += per_word) words++;
    return words;
}

/* a * b for a small a (|a| <= 128): shifts and adds when there is no multiplier. */
SPECIALIZE int32_t multiply_small(int32_t a, int32_t b)
{
#ifdef BITNETMCU_NO_MUL
    uint32_t m = a < 0 ? (uint32_t)-a : (uint32_t)a;
    int32_t product = 0;
    for (; m; m >>= 1, b = shl(b, 1))
        if (m & 1u) product += b;
    return a < 0 ? -product : product;
#else
    return a * b;
#endif
}

/* The same, as one shared copy of the loop where it is not in a hot path (inline where it is a multiply). */
#ifdef BITNETMCU_NO_MUL
static NOINLINE int32_t times_small(int32_t a, int32_t b)
{
    return multiply_small(a, b);
}
#else
SPECIALIZE int32_t times_small(int32_t a, int32_t b)
{
    return a * b;
}
#endif

/* a times the weight that `code` stands for. Only 8bit multiplies (NF4: shifts and adds without a multiplier). */
SPECIALIZE int32_t times_code(int32_t a, uint32_t code, enum qtype t)
{
    int32_t v = 0;
    switch (t) {
    case BINARY:
        return code ? a : -a;
    case TWOBITSYM:
        v = (code & 1u) ? a + a + a : a;
        return (code & 2u) ? -v : v;
    case FOURBITSYM:   /* (2m + 1) * a by shifts and adds */
    case FIVEBITSYM:
        v = a;
        if (code & 1u) v += shl(a, 1);
        if (code & 2u) v += shl(a, 2);
        if (code & 4u) v += shl(a, 3);
        if (t == FOURBITSYM) return (code & 8u) ? -v : v;
        if (code & 8u) v += shl(a, 4);
        return (code & 16u) ? -v : v;
    case FOURBIT:      /* two's complement: -8 b3 + 4 b2 + 2 b1 + b0 */
        if (code & 1u) v += a;
        if (code & 2u) v += shl(a, 1);
        if (code & 4u) v += shl(a, 2);
        if (code & 8u) v -= shl(a, 3);
        return v;
    case EIGHTBIT:
        return a * (int32_t)(int8_t)code;
    case FP130:
        v = shl(a, code & 7u);
        return (code & 8u) ? -v : v;
    case NF2:          /* 3a or 10a: two adds */
        v = shl(a, 1) + ((code & 1u) ? shl(a, 3) : a);
        return (code & 2u) ? -v : v;
    case NF4:
        return multiply_small(a, BitNetMCU_nf4_levels[code]);
    }
    return 0;
}

/* Output-major (original) layout: one dot product per output row. */
SPECIALIZE void fc_rows(const int8_t *in, uint32_t n_in, const uint32_t *w, int32_t *sums, uint32_t n_out,
                           enum qtype t)
{
    uint32_t bits = code_bits(t), spare = 32u % bits;   /* 5bitsym: 6 codes a word, bits 1-0 unused */
    for (uint32_t o = 0; o < n_out; o++) {
        int32_t sum = 0;
        uint32_t word = 0, left = 0;
        for (uint32_t i = 0; i < n_in; i++) {
            if (left == 0) {
                word = *w++;
                left = 32u - spare;
            }
            left -= bits;
            sum += times_code(in[i], (word >> (left + spare)) & ((1u << bits) - 1u), t);
        }
        sums[o] = sum;
    }
}

/* The products of activation a with every code of the type, built once per non-zero input.
 * |a| <= 128 and |weight| <= 128, so each fits in 16 bits. 4bitsym's loop is unrolled (GCC, clang): a product
 * pair costs four instructions instead of about ten (the windowed models build a table per digit pixel and
 * window); the other types' by four, in less code. */
SPECIALIZE void build_table(int32_t a, int16_t *table, enum qtype t)
{
    int32_t v = a, step = a + a;
    switch (t) {
    case FOURBITSYM:   /* a, 3a, 5a, ... 15a (5bitsym: ... 31a) and their negatives */
    case FIVEBITSYM: {
        uint32_t half = 1u << (code_bits(t) - 1u);
#pragma GCC unroll 8
        for (uint32_t k = 0; k < half; k++, v += step) {
            table[k] = (int16_t)v;
            table[k + half] = (int16_t)-v;
        }
        break;
    }
    case FOURBIT:      /* 0, a, ... 7a, then -8a ... -a */
        v = 0;
        step = -shl(a, 3);
#pragma GCC unroll 4
        for (uint32_t k = 0; k < 8u; k++, v += a) {
            table[k] = (int16_t)v;
            table[k + 8u] = (int16_t)(v + step);
        }
        break;
    case FP130:        /* a, 2a, 4a, ... 128a and their negatives */
#pragma GCC unroll 4
        for (uint32_t k = 0; k < 8u; k++, v += v) {
            table[k] = (int16_t)v;
            table[k + 8u] = (int16_t)-v;
        }
        break;
    default:           /* Binary, 2bitsym, NF2: 2 or 4 entries; NF4: 16 products */
        for (uint32_t code = 0; code < (1u << code_bits(t)); code++)
            table[code] = (int16_t)times_code(a, code, t);
        break;
    }
}

/* table entry for the 4-bit code at bit position `pos` of word: the code x 2 is a byte offset. */
#define TABLE4(base, word, pos) (*(const int16_t *)((base) + (((word) >> (pos)) & 0x1Eu)))

/* sums[0..3] += two inputs' look-ups for the upper half of c and d (weights of 4 outputs each): per look-up a
 * shift, a mask, an address and a load, and each sum loaded and stored once for both inputs. */
#define ADD_HALF_WORD4(s, base, c, other, d)                           \
    do {                                                             \
        (s)[0] += TABLE4(base, c, 27) + TABLE4(other, d, 27);        \
        (s)[1] += TABLE4(base, c, 23) + TABLE4(other, d, 23);        \
        (s)[2] += TABLE4(base, c, 19) + TABLE4(other, d, 19);        \
        (s)[3] += TABLE4(base, c, 15) + TABLE4(other, d, 15);        \
    } while (0)

/* sums += two inputs' look-ups, 8 outputs per word of 4-bit codes (weights w and v, tables base and other): 110
 * instructions a word of each, where one input at a time took 128. Half a word a pass: half the flash of a
 * full unroll for 8 % more time. A lone input goes with a table of zeros, whose look-ups add nothing. */
static NOINLINE void add_rows4(int32_t *s, const uint32_t *w, const char *base, const uint32_t *v,
                               const char *other, uint32_t words)
{
    for (const uint32_t *end = w + words; w != end;) {
        uint32_t c = *w++, d = *v++;
        for (uint32_t half = 0; half < 2u; half++, c <<= 16, d <<= 16, s += 4)
            ADD_HALF_WORD4(s, base, c, other, d);
    }
}

typedef void (*add_rows_pass)(int32_t *, const uint32_t *, const char *, const uint32_t *, const char *, uint32_t);

/* add_rows4 a word a pass, for the window stems (their first layer runs on every window, most of a windowed
 * model's time; flash they have to spare, where the CH32V003 CNN has none). */
static NOINLINE void add_rows4_unrolled(int32_t *s, const uint32_t *w, const char *base, const uint32_t *v,
                                        const char *other, uint32_t words)
{
    for (const uint32_t *end = w + words; w != end; s += 8) {
        uint32_t c = *w++, d = *v++;
        ADD_HALF_WORD4(s, base, c, other, d);
        ADD_HALF_WORD4(s + 4, base, c << 16, other, d << 16);
    }
}

/* sums += one input's look-ups in a table of 32 (5bitsym), 6 outputs per word of 5-bit codes in bits 31-2. */
#define TABLE5(base, word, pos) (*(const int16_t *)((base) + (((word) >> (pos)) & 0x3Eu)))
static NOINLINE void add_row5(int32_t *s, const uint32_t *w, const char *base, uint32_t words)
{
    for (const uint32_t *end = w + words; w != end; s += 6) {
        uint32_t c = *w++;
        s[0] += TABLE5(base, c, 26);
        s[1] += TABLE5(base, c, 21);
        s[2] += TABLE5(base, c, 16);
        s[3] += TABLE5(base, c, 11);
        s[4] += TABLE5(base, c, 6);
        s[5] += TABLE5(base, c, 1);
    }
}

/* 1- and 2-bit types: the codes of 4 / bits consecutive inputs sit side by side as one 4-bit code. Half
 * of that code (one 2-bit input, or two 1-bit inputs) and its 4 summed products, from the inputs left (an input
 * past n_in counts as `zero`). */
SPECIALIZE void group_half(const int8_t *in, uint32_t left, int32_t zero, int32_t half[4], enum qtype t)
{
    int32_t x0 = left > 0u ? in[0] - zero : 0, x1 = left > 1u ? in[1] - zero : 0;
    for (uint32_t c = 0; c < 4u; c++)
        half[c] = code_bits(t) == 2u ? times_code(x0, c, t) : times_code(x0, c >> 1, t) + times_code(x1, c & 1u, t);
}

/* The table of a group: for each 4-bit code, the sum of the group's products. Returns 0 where every input of
 * the group is `zero`: nothing to add. */
SPECIALIZE uint32_t build_group_table(const int8_t *in, uint32_t left, int32_t zero, int16_t table[16], enum qtype t)
{
    uint32_t half = 2u / code_bits(t), any = 0;   /* inputs per half */
    for (uint32_t j = 0; j < half + half && j < left; j++) any |= (uint32_t)(in[j] - zero);
    if (!any) return 0;
    int32_t high[4], low[4];
    group_half(in, left, zero, high, t);
    group_half(in + half, left > half ? left - half : 0u, zero, low, t);
    for (uint32_t h = 0; h < 4u; h++, table += 4) {
        table[0] = (int16_t)(high[h] + low[0]);
        table[1] = (int16_t)(high[h] + low[1]);
        table[2] = (int16_t)(high[h] + low[2]);
        table[3] = (int16_t)(high[h] + low[3]);
    }
    return 1;
}

/* Input-major layout: each input that differs from `zero` adds its products to all outputs, one table
 * look-up each (1- and 2-bit types: each group of inputs, one look-up for 4 or 2 weights); inputs equal to
 * `zero` are skipped and their share, zero * rowsums[o] (or background[o], where it was made once), added at
 * the end.
 * Hidden layers pass zero = 0 (ReLU zeros are skipped for free); the first layer passes the image's
 * background value, so only the pixels of the digit cost anything. The inputs are `rows` rows of `cols`,
 * `stride` apart (a window of the image; one row for a plain layer). add_rows: the pass of two inputs. */
SPECIALIZE void fc_columns(const int8_t *in, uint32_t cols, uint32_t rows, uint32_t stride, const uint32_t *w,
                           int32_t *sums, uint32_t n_out, int32_t zero, const int16_t *rowsums,
                           const int32_t *background, add_rows_pass add_rows, enum qtype t)
{
    uint32_t group = code_bits(t) < 4u ? 4u / code_bits(t) : 1u;
    uint32_t per_word = group > 1u ? 8u : 32u / code_bits(t);   /* codes a look-up reads in a word */
    uint32_t words = whole_words(n_out, per_word), slots = words * per_word;
    /* two inputs' tables (5bitsym: one of 32), |weight x input difference| <= 128 x 255, a group's sum
     * <= 2 x 10 x 255 (NF2): int16 */
    int16_t tables[32];
    const uint32_t *waiting = NULL;   /* the weights of a non-zero input whose table (the first) is built */
    for (uint32_t o = 0; o < slots; o++) sums[o] = 0;
    for (; rows; rows--, in += stride)
    for (uint32_t i = 0; i < cols; i += group, w += words) {
#if defined(__GNUC__)
        __asm__("" : "+r"(w)); /* else GCC advances w by cols x words per row: a multiply */
#endif
        int32_t a = in[i] - zero;
        int16_t *table = waiting ? tables + 16 : tables;
        if (group > 1u ? !build_group_table(in + i, cols - i, zero, table, t) : a == 0) continue;
        if (t == EIGHTBIT) {
            const uint32_t *c = w;
            for (int32_t *s = sums; s < sums + slots; c++)
                for (uint32_t j = 0; j < 4u; j++) *s++ += times_code(a, (*c << (8u * j)) >> 24, t);
            continue;
        }
        if (group == 1u) build_table(a, table, t);
        if (t == FIVEBITSYM) {
            add_row5(sums, w, (const char *)tables, words);
            continue;
        }
        if (!waiting) {
            waiting = w;
            continue;
        }
        add_rows(sums, waiting, (const char *)tables, w, (const char *)(tables + 16), words);
        waiting = NULL;
    }
    if (waiting) {   /* a lone input: the second table zeroed */
        for (uint32_t k = 16; k < 32u; k++) tables[k] = 0;
        add_rows(sums, waiting, (const char *)tables, waiting, (const char *)(tables + 16), words);
    }
    if (background)
        for (uint32_t o = 0; o < n_out; o++) sums[o] += background[o];
    else if (zero != 0)
        for (uint32_t o = 0; o < n_out; o++) sums[o] += times_small(zero, rowsums[o]);   /* once a layer: the shared copy */
}

void BitNetMCU_background_sums(int32_t zero, const int16_t *rowsums, int32_t *background, uint32_t n)
{
    for (uint32_t o = 0; o < n; o++) background[o] = times_small(zero, rowsums[o]);
}

#define BITNETMCU_DEFINE_FC(name, id, bits)                                                  \
    BITNETMCU_FC_COLUMNS_KERNEL(BitNetMCU_fc_##name)                                              \
    {                                                                                             \
        fc_columns(input, n_in, 1u, 0u, weights, sums, n_out, zero, rowsums, NULL, add_rows4, id);\
    }                                                                                             \
    BITNETMCU_FC_WINDOW_KERNEL(BitNetMCU_fc_window_##name)                                        \
    {                                                                                             \
        fc_columns(input, cols, rows, stride, weights, sums, n_out, zero, NULL, background,       \
                   add_rows4_unrolled, id);                                                       \
    }                                                                                             \
    BITNETMCU_FC_KERNEL(BitNetMCU_fc_rows_##name) { fc_rows(input, n_in, weights, sums, n_out, id); }
BITNETMCU_FC_TYPES(BITNETMCU_DEFINE_FC)

/* Ternary: 10 trits per uint16_t as a base-3 fraction; x3 moves the next trit into bits 16-17. */
BITNETMCU_FC_KERNEL(BitNetMCU_fc_rows_Ternary)
{
    const uint16_t *w = weights;
    for (uint32_t o = 0; o < n_out; o++) {
        int32_t sum = 0;
        uint32_t frac = 0, left = 0;
        for (uint32_t i = 0; i < n_in; i++) {
            if (left == 0) {
                frac = *w++;
                left = 10;
            }
            left--;
            frac = (frac << 1) + frac; /* x3 without a multiply */
            uint32_t trit = frac >> 16;
            frac &= 0xFFFFu;
            if (trit == 0u)
                sum += input[i];
            else if (trit == 1u)
                sum -= input[i];
        }
        sums[o] = sum;
    }
}

/* ------------------------------------------------------------------------------------------------
 * Requantization, convolutions on int32 planes, pooling, argmax
 * ------------------------------------------------------------------------------------------------ */

static int32_t largest(const int32_t *values, uint32_t n)
{
    int32_t max = values[0];
    for (uint32_t i = 1; i < n; i++)
        if (values[i] > max) max = values[i];
    return max;
}

/* ReLU, then the smallest shift k that brings the largest input to `top` or less, with rounding. */
static void shift_relu(const int32_t *input, int8_t *output, uint32_t n, int32_t top)
{
    int32_t max = largest(input, n);
    uint32_t shift = 0;
    while ((max >> shift) > top) shift++;
    uint32_t half = (1u << shift) >> 1;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t v = input[i] > 0 ? ((uint32_t)input[i] + half) >> shift : 0u;
        output[i] = (int8_t)(v > (uint32_t)top ? (uint32_t)top : v);
    }
}

/* round(127 x / peak) for x > 0, exactly: (254 x + peak) / (2 peak) by long division, the quotient's 7 bits
 * shifted into the remainder's low bits (the divisor's are zero), 3 instructions a bit unrolled. */
void BitNetMCU_requantize8(const int32_t *sums, int8_t *output, uint32_t n)
{
    int32_t max = largest(sums, n);
    uint32_t peak = max > 0 ? (uint32_t)max : 1u, shift = 0;
    while (peak >> shift >= (1u << 23)) shift++;   /* then 254 x + peak and the divisor stay below 2^31 */
    peak >>= shift;
    uint32_t divisor = peak << 8;   /* 2 peak, 7 bits up */
    for (uint32_t i = 0; i < n; i++) {
        uint32_t x = sums[i] > 0 ? (uint32_t)sums[i] >> shift : 0u, rest = (x << 8) - (x << 1) + peak;
        if (x == 0u) {
            output[i] = 0;
            continue;
        }
#pragma GCC unroll 7
        for (uint32_t bit = 0; bit < 7u; bit++) {
            rest <<= 1;
            if (rest >= divisor) rest -= divisor - 1u;
        }
        output[i] = (int8_t)(rest & 127u);
    }
}

void BitNetMCU_requantize4_shift(const int32_t *sums, int8_t *output, uint32_t n)
{
    shift_relu(sums, output, n, 15);
}

/* s x a for an 8-bit s: at most 8 shifts and adds without a multiplier. */
SPECIALIZE uint32_t times_u8(uint32_t s, uint32_t a)
{
#ifdef BITNETMCU_NO_MUL
    uint32_t product = 0;
    for (; s; s >>= 1, a <<= 1)
        if (s & 1u) product += a;
    return product;
#else
    return s * a;
#endif
}

void BitNetMCU_requantize4_reciprocal(const int32_t *sums, int8_t *output, uint32_t n)
{
    int32_t max = largest(sums, n);
    uint32_t peak = max > 0 ? (uint32_t)max : 1u, k = 0, s = 0;
    while ((15u << k) < peak) k++;
    /* s = floor(15 x 2^(k+7) / peak) by long division, without a divider: the quotient of 15 x 2^k (1, or up to 15
     * when k = 0), then 7 more bits. The remainder stays below peak, so doubling it never overflows. */
    uint32_t rest = 15u << k;
    while (rest >= peak) {
        rest -= peak;
        s++;
    }
    for (uint32_t bit = 0; bit < 7u; bit++) {
        rest <<= 1;
        s <<= 1;
        if (rest >= peak) {
            rest -= peak;
            s |= 1u;
        }
    }
    if (s > 255u) s = 255u;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t v = sums[i] > 0 ? times_u8(s, (uint32_t)sums[i]) >> (k + 7u) : 0u;
        output[i] = (int8_t)(v > 15u ? 15u : v);
    }
}

void BitNetMCU_fc_products(const int8_t *input, uint32_t n_in, const uint32_t *w, int32_t *sums, uint32_t n_out,
                           const int16_t *products)
{
    uint32_t words = (n_out + 7u) >> 3;
    const uint32_t *waiting = NULL;   /* the weights of a non-zero input, and its row of the table */
    const char *waiting_row = NULL;
    for (uint32_t o = 0; o < words << 3; o++) sums[o] = 0;
    for (uint32_t i = 0; i < n_in; i++, w += words) {
        uint32_t a = (uint8_t)input[i];
        if (a == 0u) continue;
        const char *row = (const char *)(products + (a << 4));
        if (!waiting) {
            waiting = w;
            waiting_row = row;
            continue;
        }
        add_rows4(sums, waiting, waiting_row, w, row, words);
        waiting = NULL;
    }
    if (waiting)   /* a lone input goes with row 0 of the table: 0 x every weight */
        add_rows4(sums, waiting, waiting_row, waiting, (const char *)products, words);
}

void BitNetMCU_requantize(const int32_t *sums, uint32_t shift, int8_t *output, uint32_t n)
{
    uint32_t half = (1u << shift) >> 1;
    for (uint32_t i = 0; i < n; i++) {   /* a sum <= 0 gives 0: only positive ones are rounded, in unsigned range */
        uint32_t v = sums[i] > 0 ? ((uint32_t)sums[i] + half) >> shift : 0u;
        output[i] = (int8_t)(v > 127u ? 127u : v);
    }
}

/* The 3x3 convolution, defined for an int8 (image) and an int32 (feature map) input. Output pixel
 * (y, x) is written to y * (size - 2) + x, never past the first input pixel a later output still
 * reads (y * size + x + 1 onwards), so output may be the input itself. */
#define BITNETMCU_CONV3X3(name, input_type)                                                         \
    void name(const input_type *input, uint32_t size, const int8_t *w, uint32_t shift, int32_t *output) \
    {                                                                                               \
        uint32_t out_size = size - 2u;                                                              \
        for (uint32_t y = 0; y < out_size; y++, input += size) {                                    \
            for (uint32_t x = 0; x < out_size; x++) {                                               \
                const input_type *r0 = input + x, *r1 = r0 + size, *r2 = r1 + size;                 \
                int32_t sum = r0[0] * w[0] + r0[1] * w[1] + r0[2] * w[2]                            \
                            + r1[0] * w[3] + r1[1] * w[4] + r1[2] * w[5]                            \
                            + r2[0] * w[6] + r2[1] * w[7] + r2[2] * w[8];                           \
                *output++ = sum > 0 ? sum >> shift : 0;                                             \
            }                                                                                       \
        }                                                                                           \
    }
BITNETMCU_CONV3X3(BitNetMCU_conv3x3_relu, int32_t)
BITNETMCU_CONV3X3(BitNetMCU_conv3x3_relu_image, int8_t)

/* 2x2 max pooling of int32 and of uint8 planes. Output i is written after inputs 0 .. 2i have been read, so
 * output may be the input itself. */
#define BITNETMCU_MAXPOOL2(name, type)                                            \
    void name(const type *input, uint32_t size, type *output)                     \
    {                                                                             \
        for (uint32_t y = 0; y < size; y += 2u, input += 2u * size) {             \
            for (uint32_t x = 0; x < size; x += 2u) {                             \
                type m = input[x];                                                \
                if (input[x + 1u] > m) m = input[x + 1u];                         \
                if (input[size + x] > m) m = input[size + x];                     \
                if (input[size + x + 1u] > m) m = input[size + x + 1u];           \
                *output++ = m;                                                    \
            }                                                                     \
        }                                                                         \
    }
BITNETMCU_MAXPOOL2(BitNetMCU_maxpool2, int32_t)
BITNETMCU_MAXPOOL2(BitNetMCU_maxpool2_u8, uint8_t)

uint32_t BitNetMCU_argmax(const int32_t *values, uint32_t n)
{
    uint32_t best = 0;
    for (uint32_t i = 1; i < n; i++)
        if (values[i] > values[best]) best = i;
    return best;
}

/* ------------------------------------------------------------------------------------------------
 * Convolutions with int8 activations: the plane, the weights, requantization, any weights per tap
 * ------------------------------------------------------------------------------------------------ */

int32_t BitNetMCU_unsigned_image(const int8_t *image, uint8_t *plane, uint32_t n)
{
    int32_t min = image[0];
    for (uint32_t i = 1; i < n; i++)
        if (image[i] < min) min = image[i];
    for (uint32_t i = 0; i < n; i++) plane[i] = (uint8_t)(image[i] - min);
    return min;
}

/* The 9 weights of one channel as integers (times_code(1, code) folds to the level of the code). */
SPECIALIZE void channel_weights(const uint32_t *w, int32_t weight[9], enum qtype t)
{
    uint32_t bits = code_bits(t), spare = 32u % bits, word = 0, left = 0;   /* spare: as in fc_rows */
    for (uint32_t i = 0; i < 9u; i++) {
        if (left == 0) {
            word = *w++;
            left = 32u - spare;
        }
        left -= bits;
        weight[i] = times_code(1, (word >> (left + spare)) & ((1u << bits) - 1u), t);
    }
}

/* sum >> shift, clamped to the 7-bit activation range (the rounding half is already in sum). */
SPECIALIZE uint8_t requantize(int32_t sum, uint32_t shift)
{
    uint32_t q = (uint32_t)(sum >> shift);   /* one unsigned compare finds both ends of the range */
    if (q > 127u) q = sum < 0 ? 0u : 127u;
    return (uint8_t)q;
}

/* weight x input: a shift for a power of two (log2 < 32), else shifts and adds (or a multiply). */
SPECIALIZE int32_t times_weight(int32_t weight, uint32_t log2, int32_t input)
{
    if (log2 < 32u) {
        int32_t v = shl(input, log2);
        return weight < 0 ? -v : v;
    }
    return times_small(weight, input);
}

/* Any weights: a product per tap. Output pixel (y, x) goes to y * (size - 2) + x, never past an input pixel
 * a later output still reads: in place works. Computes every output (an extent only saves time). */
static void conv_weights(const uint8_t *input, int32_t bias, uint32_t size, const int32_t w[9], uint32_t shift,
                         uint8_t *output)
{
    uint32_t out_size = size - 2u, log2[9];
    for (uint32_t i = 0; i < 9u; i++) {   /* 32: not a power of two */
        uint32_t magnitude = (uint32_t)(w[i] < 0 ? -w[i] : w[i]), e = 0;
        while (e < 31u && (1u << e) < magnitude) e++;
        log2[i] = (1u << e) == magnitude ? e : 32u;
    }
    for (uint32_t y = 0; y < out_size; y++, input += size) {
        for (uint32_t x = 0; x < out_size; x++) {
            const uint8_t *r0 = input + x, *r1 = r0 + size, *r2 = r1 + size;
            int32_t sum = bias;
            for (uint32_t i = 0; i < 3u; i++)
                sum += times_weight(w[i], log2[i], r0[i]) + times_weight(w[3u + i], log2[3u + i], r1[i])
                     + times_weight(w[6u + i], log2[6u + i], r2[i]);
            *output++ = requantize(sum, shift);
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * FP130 convolutions in two lanes of a register (the RV32E assembly or the same in C)
 * ------------------------------------------------------------------------------------------------ */

/* One channel's lane convolution: struct lanes (BitNetMCU_lanes.h). The RV32E assembly reads it by the offsets
 * defined there; a struct that no longer matches them stops the build here. */
#define BITNETMCU_LANES_OFFSET(field, offset) \
    typedef char bitnetmcu_lanes_##field##_at_##offset[offsetof(struct lanes, field) == (offset) ? 1 : -1]
BITNETMCU_LANES_OFFSET(r, LANES_R);
BITNETMCU_LANES_OFFSET(size, LANES_SIZE);
BITNETMCU_LANES_OFFSET(lane, LANES_LANE);
BITNETMCU_LANES_OFFSET(shift, LANES_SHIFT);
BITNETMCU_LANES_OFFSET(bias, LANES_BIAS);
BITNETMCU_LANES_OFFSET(mask, LANES_MASK);
BITNETMCU_LANES_OFFSET(fill, LANES_FILL);

/* FP130 where the lanes do not fit: per weight a shift, and an add or a subtract (r: the shift amounts of
 * fp130_setup, a negative weight's `high` further). Computes every output.
 * conv_weights does the same for any weights; taking it here (with channel_weights) instead costs the
 * CH32V003 build of the 64-wide CNN 168 bytes of flash and 76 of stack, which it does not have to spare. */
static void conv_fp130_shifts(const uint8_t *input, int32_t bias, uint32_t size, const uint32_t r[9], uint32_t high,
                              uint32_t shift, uint8_t *output)
{
    uint32_t out_size = size - 2u;
    for (uint32_t y = 0; y < out_size; y++, input += size) {
        for (uint32_t x = 0; x < out_size; x++) {
            int32_t sum = bias;
            for (uint32_t i = 0, row = x; i < 9u; i += 3u, row += size)
                for (uint32_t k = 0; k < 3u; k++) {
                    uint32_t negative = r[i + k] >= high;
                    int32_t v = shl(input[row + k], negative ? r[i + k] - high : r[i + k]);
                    sum += negative ? -v : v;
                }
            *output++ = requantize(sum, shift);
        }
    }
}

/* `n` bytes of `value` from p on, by words where they are aligned. */
static void fill_plane(uint8_t *p, uint32_t n, uint32_t value)
{
    uint8_t *end = p + n;
#if defined(__GNUC__)
    typedef uint32_t __attribute__((may_alias)) four_bytes;
    uint32_t word = value | value << 8;
    word |= word << 16;
    for (; p != end && ((uintptr_t)p & 3u); p++) *p = (uint8_t)value;
    uint8_t *words_end = p + ((uint32_t)(end - p) & ~3u);
    for (; (uint32_t)(words_end - p) >= 16u; p += 16) {   /* by fours: a store a word, and the loop a fourth as often */
        four_bytes *q = (four_bytes *)p;
        q[0] = word;
        q[1] = word;
        q[2] = word;
        q[3] = word;
    }
    for (; p != words_end; p += 4) *(four_bytes *)p = word;
#endif
    for (; p != end; p++) *p = (uint8_t)value;
}

#if defined(__riscv) && __riscv_xlen == 32 && !defined(BITNETMCU_NO_ASM)
/* The lane convolution in RV32E assembly: BitNetMCU_lanes_rv32e.S (its frame and lane loops are described there). */
typedef void lane_loop_fn(void);   /* not callable from C */
extern lane_loop_fn bitnetmcu_lane_loop16, bitnetmcu_lane_loop14, bitnetmcu_lane_loop6;
void bitnetmcu_fp130_lanes(const uint8_t *input, const struct lanes *c, uint8_t *output, const uint8_t *extent,
                           uint32_t pool, lane_loop_fn *loop);
/* The lane loop of a plane size, or 0 (then the per-weight path). */
SPECIALIZE lane_loop_fn *lane_loop(uint32_t size)
{
    return size == 16u ? bitnetmcu_lane_loop16 : size == 14u ? bitnetmcu_lane_loop14
         : size == 6u ? bitnetmcu_lane_loop6 : (lane_loop_fn *)0;
}

static void conv_fp130_lanes(const uint8_t *input, const struct lanes *c, uint8_t *output, const uint8_t *extent,
                             uint32_t pool, lane_loop_fn *loop)
{
    bitnetmcu_fp130_lanes(input, c, output, extent, pool, loop);
}
#else
/* The same in C. */

/* One output row's lane sums. With the plane size a constant the three input rows are offsets of one pointer,
 * which leaves the registers to the nine shift amounts: per weight a load, a shift and an add. */
SPECIALIZE void fp130_lane_row(const uint8_t *p, uint32_t size, const uint32_t r[9], uint32_t *acc, uint32_t n)
{
    const uint32_t r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3], r4 = r[4], r5 = r[5], r6 = r[6], r7 = r[7], r8 = r[8];
    const uint32_t s2 = size + size;
#define BITNETMCU_LANE_SUM(q)                                                                                \
    (((uint32_t)(q)[0] << r0) + ((uint32_t)(q)[1] << r1) + ((uint32_t)(q)[2] << r2)                          \
     + ((uint32_t)(q)[size] << r3) + ((uint32_t)(q)[size + 1u] << r4) + ((uint32_t)(q)[size + 2u] << r5)     \
     + ((uint32_t)(q)[s2] << r6) + ((uint32_t)(q)[s2 + 1u] << r7) + ((uint32_t)(q)[s2 + 2u] << r8))
    for (uint32_t *end = acc + n; acc != end; acc++, p++)
        *acc = BITNETMCU_LANE_SUM(p);
#undef BITNETMCU_LANE_SUM
}

/* One row's n lane sums from p on (one output each) into acc. */
typedef void lane_loop_fn(const uint8_t *p, const struct lanes *c, uint32_t *acc, uint32_t n);

static NOINLINE void fp130_lane_row_any(const uint8_t *p, const struct lanes *c, uint32_t *acc, uint32_t n)
{
    fp130_lane_row(p, c->size, c->r, acc, n);
}

/* With the plane size of the 16x16 models' first convolution as a constant. */
static NOINLINE void fp130_lane_row16(const uint8_t *p, const struct lanes *c, uint32_t *acc, uint32_t n)
{
    fp130_lane_row(p, 16u, c->r, acc, n);
}

/* A lane sum as the convolution's sum: low lane minus high lane. */
SPECIALIZE int32_t lane_value(uint32_t acc, uint32_t mask, uint32_t lane)
{
    return (int32_t)(acc & mask) - (int32_t)(acc >> lane);
}

/* c->fill in the output columns [0, lo) and [hi, n). */
SPECIALIZE void fill_outside(const struct lanes *c, uint8_t *output, uint32_t lo, uint32_t hi, uint32_t n)
{
    for (uint32_t x = 0; x < lo; x++) output[x] = (uint8_t)c->fill;
    for (uint32_t x = hi; x < n; x++) output[x] = (uint8_t)c->fill;
}

/* The output columns [lo, hi) of a row from their lane sums (acc[0] is column lo's). */
static NOINLINE void fp130_requantize_row(const struct lanes *c, const uint32_t *acc, uint32_t lo, uint32_t hi,
                                          uint8_t *output)
{
    for (uint32_t x = lo; x < hi; x++)
        output[x] = requantize(lane_value(*acc++, c->mask, c->lane) + c->bias, c->shift);
}

/* The same with 2x2 max pooling: two rows of lane sums (the second BITNETMCU_MAX_PLANE - 2 words after the
 * first) over the even columns [lo, hi) to one pooled output row: the requantized maximum of each four sums,
 * the same as the maximum of their requantized values (requantization never decreases), for a quarter of the
 * work. */
static NOINLINE void fp130_pool_row(const struct lanes *c, const uint32_t *acc, uint32_t lo, uint32_t hi,
                                    uint8_t *output)
{
    const uint32_t below = BITNETMCU_MAX_PLANE - 2u;
    for (uint32_t x = lo >> 1; x < hi >> 1; x++, acc += 2) {
        int32_t m = lane_value(acc[0], c->mask, c->lane);
        for (uint32_t k = 1; k < 4u; k++) {
            int32_t v = lane_value(acc[k == 1u ? 1u : k == 2u ? below : below + 1u], c->mask, c->lane);
            if (v > m) m = v;
        }
        output[x] = requantize(m + c->bias, c->shift);
    }
    fill_outside(c, output, lo >> 1, hi >> 1, (c->size - 2u) >> 1);
}

/* Output row y's columns to compute, [*lo, *hi): the extent's, or all of them without one. */
SPECIALIZE void row_extent(const uint8_t *extent, uint32_t y, uint32_t n, uint32_t *lo, uint32_t *hi)
{
    *lo = extent ? extent[2u * y] : 0u;
    *hi = extent ? extent[2u * y + 1u] : n;
}

/* With pooling, the columns of output rows y and y+1 to compute: the union of their extents, to whole pairs. */
SPECIALIZE void pair_extent(const uint8_t *extent, uint32_t y, uint32_t n, uint32_t *lo, uint32_t *hi)
{
    uint32_t lo2, hi2;
    row_extent(extent, y, n, lo, hi);
    row_extent(extent, y + 1u, n, &lo2, &hi2);
    if (*lo >= *hi) {
        *lo = lo2;
        *hi = hi2;
    } else if (lo2 < hi2) {
        if (lo2 < *lo) *lo = lo2;
        if (hi2 > *hi) *hi = hi2;
    }
    if (*lo >= *hi) *lo = *hi = 0;
    *lo &= ~1u;
    *hi = (*hi + 1u) & ~1u;
}

/* Row by row, the lane sums of the columns to compute, then their outputs (the plane holds the fill already);
 * with pooling, by pairs of rows, and the fill written around the pooled outputs. */
static NOINLINE void conv_fp130_lanes(const uint8_t *input, const struct lanes *c, uint8_t *output,
                                      const uint8_t *extent, uint32_t pool, lane_loop_fn *row)
{
    const uint32_t size = c->size, out_size = size - 2u;
    uint32_t acc[2][BITNETMCU_MAX_PLANE - 2], lo, hi;
    if (!pool) {
        for (uint32_t y = 0; y < out_size; y++, input += size, output += out_size) {
            row_extent(extent, y, out_size, &lo, &hi);
            if (lo >= hi) continue;
            row(input + lo, c, acc[0], hi - lo);
            fp130_requantize_row(c, acc[0], lo, hi, output);
        }
        return;
    }
    for (uint32_t y = 0; y < out_size; y += 2u, input += 2u * size, output += out_size >> 1) {
        pair_extent(extent, y, out_size, &lo, &hi);
        row(input + lo, c, acc[0], hi - lo);
        row(input + size + lo, c, acc[1], hi - lo);
        fp130_pool_row(c, acc[0], lo, hi, output);
    }
}

/* The row function of a plane size, or 0 (wider than BITNETMCU_MAX_PLANE: the per-weight path). */
SPECIALIZE lane_loop_fn *lane_loop(uint32_t size)
{
    return size > BITNETMCU_MAX_PLANE ? (lane_loop_fn *)0 : size == 16u ? fp130_lane_row16 : fp130_lane_row_any;
}
#endif

/* The shift amount of a code (bit 3 the sign): a negative weight's `high` further. */
SPECIALIZE uint32_t shift_amount(uint32_t code, uint32_t high)
{
    return (code & 8u) ? (code & 7u) + high : code;
}

/* FP130 in lanes: each weight is +-2^e, so input << e is its product. Positive weights add into the low
 * `lane` bits of one register, negative ones (shifted `lane` bits further) into the bits above, and the sum
 * is low minus high: one shift and one add per weight, with no sign to test. The channel's smallest exponent
 * `low` (at most `shift`) comes out of every product: the lanes sum input << (e - low), a bit narrower each, and
 * (sum x 2^low + bias) >> shift is (sum + (bias >> low)) >> (shift - low) exactly.
 * The exporter did the channel's set-up (intmodel.pack_fp130_conv): the codes hold e - low, and the second word
 * the lane width, low, the weight sum and the largest input the lanes hold. Fills c->r with the shift amounts,
 * a negative weight's the lane width further (into the high lane), and returns the lane width; or, where the lanes
 * do not hold the input (127 - offset), with the codes as they are, 8 further, and returns 0. */
static uint32_t fp130_setup(const uint32_t *codes, int32_t offset, struct lanes *c, int32_t *weight_sum, uint32_t *low)
{
    uint32_t setup = codes[1], max_input = (setup >> 20) & 255u, lane = (setup >> 15) & 31u;
    *low = (setup >> 12) & 7u;
    *weight_sum = (int32_t)(setup << 20) >> 20;
    if ((uint32_t)(127 - offset) > max_input) lane = 0;
    uint32_t high = lane ? lane : 8u, word = codes[0];
    for (uint32_t *r = c->r; r != c->r + 8; r++, word <<= 4) *r = shift_amount(word >> 28, high);
    c->r[8] = shift_amount(setup >> 28, high);
    return lane;
}

/* ------------------------------------------------------------------------------------------------
 * The int8-activation convolution kernels, one per weight type
 * ------------------------------------------------------------------------------------------------ */

/* The sum of a channel's weights. */
SPECIALIZE int32_t weight_sum(const int32_t w[9])
{
    int32_t total = 0;
    for (uint32_t i = 0; i < 9u; i++) total += w[i];
    return total;
}

/* The input is plane + offset: its share, offset x the sum of the weights, is added once with the rounding.
 * Outside the extent every input is `fill`, every output the same: returned. */
static uint32_t qconv_weights(const uint8_t *input, int32_t offset, uint32_t size, const int32_t w[9], uint32_t shift,
                              uint8_t *output, uint32_t fill, uint32_t pool)
{
    int32_t total = weight_sum(w);
    int32_t bias = times_small(offset, total) + (int32_t)((1u << shift) >> 1);
    conv_weights(input, bias, size, w, shift, output);
    if (pool) BitNetMCU_maxpool2_u8(output, size - 2u, output);
    return requantize(times_small((int32_t)fill, total) + bias, shift);
}

/* FP130 sums shifts (in lanes where they fit); every other type takes a product per weight. */
SPECIALIZE uint32_t qconv(const uint8_t *input, int32_t offset, uint32_t size, const uint32_t *codes, uint32_t shift,
                          uint8_t *output, const uint8_t *extent, uint32_t fill, uint32_t pool, enum qtype t)
{
    if (t == FP130) {
        struct lanes c;
        int32_t total;   /* the sum of the weights */
        uint32_t low, lane = fp130_setup(codes, offset, &c, &total, &low);
        /* the offset is 0 after the first convolution, the fill 0 in it: no multiply then */
        int32_t bias = (offset ? times_small(offset, total) : 0) + (int32_t)((1u << shift) >> 1);
        uint8_t fill_out = requantize((fill ? times_small((int32_t)fill, total) : 0) + bias, shift);
        c.shift = shift - low;
        c.bias = bias >> low;
        lane_loop_fn *loop = lane ? lane_loop(size) : (lane_loop_fn *)0;
        if (loop) {
            c.size = size;
            c.lane = lane;
            c.mask = (1u << lane) - 1u;
            c.fill = fill_out;
            if (!pool && output == input) extent = 0;   /* in place: every output computed, the fill too */
            if (!pool && extent)   /* the plane filled at once; then the rows write only what they compute */
                fill_plane(output, (uint32_t)times_small((int32_t)size - 2, (int32_t)size - 2), fill_out);
            conv_fp130_lanes(input, &c, output, extent, pool, loop);
        } else {
            conv_fp130_shifts(input, c.bias, size, c.r, lane ? lane : 8u, c.shift, output);
            if (pool) BitNetMCU_maxpool2_u8(output, size - 2u, output);
        }
        return fill_out;
    }
    int32_t w[9];
    channel_weights(codes, w, t);
    return qconv_weights(input, offset, size, w, shift, output, fill, pool);
}

#define BITNETMCU_DEFINE_QCONV(name, id, bits)                                               \
    BITNETMCU_QCONV_KERNEL(BitNetMCU_qconv3x3_##name)                                             \
    {                                                                                             \
        return qconv(input, offset, size, weights, shift, output, extent, fill, pool, id);        \
    }
BITNETMCU_FC_TYPES(BITNETMCU_DEFINE_QCONV)

BITNETMCU_QCONV_KERNEL(BitNetMCU_qconv3x3_Ternary)
{
    int32_t w[9];
    uint32_t frac = *(const uint16_t *)weights;
    for (uint32_t i = 0; i < 9u; i++) {   /* the trits of fc_rows_Ternary: +1 -> 0, -1 -> 1, 0 -> 2 */
        frac = (frac << 1) + frac;
        uint32_t trit = frac >> 16;
        frac &= 0xFFFFu;
        w[i] = trit == 0u ? 1 : trit == 1u ? -1 : 0;
    }
    (void)extent;   /* computes every output: the extent only saves time */
    return qconv_weights(input, offset, size, w, shift, output, fill, pool);
}

/* ------------------------------------------------------------------------------------------------
 * Extents: where a plane can differ from its background
 * ------------------------------------------------------------------------------------------------ */

void BitNetMCU_plane_extent(const uint8_t *plane, uint32_t size, uint8_t *extent)
{
    for (uint32_t y = 0; y < size; y++, plane += size, extent += 2) {
        uint32_t lo = size, hi = 0;
        for (uint32_t x = 0; x < size; x++)
            if (plane[x]) {
                if (lo == size) lo = x;
                hi = x + 1u;
            }
        extent[0] = (uint8_t)(lo < hi ? lo : 0u);
        extent[1] = (uint8_t)hi;
    }
}

void BitNetMCU_conv_extent(const uint8_t *extent, uint32_t size, uint8_t *out)
{
    uint32_t n = size - 2u;
    for (uint32_t y = 0; y < n; y++, extent += 2, out += 2) {
        uint32_t lo = n, hi = 0;
        for (uint32_t k = 0; k < 6u; k += 2u)   /* input rows y .. y+2: output x sees columns x .. x+2 */
            if (extent[k] < extent[k + 1u]) {
                uint32_t a = extent[k] >= 2u ? extent[k] - 2u : 0u, b = extent[k + 1u] < n ? extent[k + 1u] : n;
                if (a < lo) lo = a;
                if (b > hi) hi = b;
            }
        out[0] = (uint8_t)(lo < hi ? lo : 0u);
        out[1] = (uint8_t)(lo < hi ? hi : 0u);
    }
}
