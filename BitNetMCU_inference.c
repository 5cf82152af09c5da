/*
 * BitNetMCU inference engine: see BitNetMCU_inference.h. Every kernel is stateless; the Python
 * reference in BitNetMCU.py computes exactly the same integers (tests compare them logit by logit).
 */
#include "BitNetMCU_inference.h"

const int8_t BitNetMCU_nf4_levels[16] = {-127, -88, -67, -50, -36, -23, -12, 0,
                                         10, 20, 31, 43, 56, 71, 92, 127};

/* a * 2^k. Shifting a negative signed value left is undefined in C; the unsigned shift is not. */
static int32_t shl(int32_t a, uint32_t k)
{
    return (int32_t)((uint32_t)a << k);
}

/* a * (2m + 1) for m in 0..7, by shifts and adds when there is no multiplier. */
static int32_t times_odd(int32_t a, uint32_t m)
{
#ifdef BITNETMCU_NO_MUL
    int32_t r = a;
    if (m & 1u) r += shl(a, 1);
    if (m & 2u) r += shl(a, 2);
    if (m & 4u) r += shl(a, 3);
    return r;
#else
    return a * (int32_t)(2u * m + 1u);
#endif
}

/* One output row: the dot product of the input with the row's packed weights. */
static int32_t dot_packed(const int8_t *in, uint32_t n, const uint32_t *w, uint32_t bits,
                          enum BitNetMCU_qtype qtype)
{
    int32_t sum = 0;
    uint32_t word = 0, left = 0;
    uint32_t mask = (1u << bits) - 1u;
    for (uint32_t i = 0; i < n; i++) {
        if (left == 0) {
            word = *w++;
            left = 32;
        }
        left -= bits;
        uint32_t code = (word >> left) & mask;
        int32_t a = in[i];
        switch (qtype) {
        case BITNETMCU_BINARY:
            sum += code ? a : -a;
            break;
        case BITNETMCU_2BITSYM: {
            int32_t v = (code & 1u) ? a + a + a : a;
            sum += (code & 2u) ? -v : v;
            break;
        }
        case BITNETMCU_4BITSYM: {
            int32_t v = times_odd(a, code & 7u);
            sum += (code & 8u) ? -v : v;
            break;
        }
        case BITNETMCU_FP130: {
            int32_t v = shl(a, code & 7u);
            sum += (code & 8u) ? -v : v;
            break;
        }
        case BITNETMCU_4BIT:
            sum += a * ((int32_t)(code ^ 8u) - 8);
            break;
        case BITNETMCU_8BIT:
            sum += a * (int32_t)(int8_t)code;
            break;
        case BITNETMCU_NF4:
            sum += a * BitNetMCU_nf4_levels[code];
            break;
        default: /* BITNETMCU_TERNARY is handled by dot_ternary() */
            break;
        }
    }
    return sum;
}

/* Ternary: each uint16_t holds 10 trits as ceil(v * 65536 / 3^10); multiplying the fraction by 3
 * moves the next trit into bits 16-17. Rows are padded to a multiple of 10 inputs. */
static int32_t dot_ternary(const int8_t *in, uint32_t n, const uint16_t *w)
{
    int32_t sum = 0;
    uint32_t frac = 0, left = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (left == 0) {
            frac = *w++;
            left = 10;
        }
        left--;
        frac = (frac << 1) + frac; /* x3 without a multiply */
        uint32_t trit = frac >> 16;
        frac &= 0xFFFFu;
        if (trit == 0u)
            sum += in[i];
        else if (trit == 1u)
            sum -= in[i];
    }
    return sum;
}

/* log2 of the bits per packed weight. */
static uint32_t log2_bits(enum BitNetMCU_qtype qtype)
{
    switch (qtype) {
    case BITNETMCU_BINARY: return 0;
    case BITNETMCU_2BITSYM: return 1;
    case BITNETMCU_8BIT: return 3;
    default: return 2;
    }
}

void BitNetMCU_fc(const int8_t *input, uint32_t n_in, const void *weights, enum BitNetMCU_qtype qtype,
                  int32_t *output, uint32_t n_out)
{
    if (qtype == BITNETMCU_TERNARY) {
        const uint16_t *w = (const uint16_t *)weights;
        uint32_t groups = 0;
        for (uint32_t i = 0; i < n_in; i += 10u) groups++; /* (n_in + 9) / 10 without a divide */
        for (uint32_t o = 0; o < n_out; o++, w += groups)
            output[o] = dot_ternary(input, n_in, w);
        return;
    }
    const uint32_t *w = (const uint32_t *)weights;
    uint32_t shift = log2_bits(qtype);
    uint32_t words = ((n_in << shift) + 31u) >> 5;
    for (uint32_t o = 0; o < n_out; o++, w += words)
        output[o] = dot_packed(input, n_in, w, 1u << shift, qtype);
}

uint32_t BitNetMCU_shiftnorm_relu(const int32_t *input, int8_t *output, uint32_t n)
{
    int32_t max = input[0];
    for (uint32_t i = 1; i < n; i++)
        if (input[i] > max) max = input[i];
    uint32_t shift = 0;
    while ((max >> shift) > 127) shift++;
    uint32_t half = (1u << shift) >> 1;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t v = input[i] > 0 ? ((uint32_t)input[i] + half) >> shift : 0u;
        output[i] = (int8_t)(v > 127u ? 127u : v);
    }
    return shift;
}

void BitNetMCU_conv3x3_relu(const int32_t *input, uint32_t size, const int8_t *weights, uint32_t shift,
                            int32_t *output)
{
    const int8_t *w = weights;
    uint32_t out_size = size - 2u;
    for (uint32_t y = 0; y < out_size; y++, input += size) {
        for (uint32_t x = 0; x < out_size; x++) {
            const int32_t *r0 = input + x, *r1 = r0 + size, *r2 = r1 + size;
            int32_t sum = r0[0] * w[0] + r0[1] * w[1] + r0[2] * w[2]
                        + r1[0] * w[3] + r1[1] * w[4] + r1[2] * w[5]
                        + r2[0] * w[6] + r2[1] * w[7] + r2[2] * w[8];
            *output++ = sum > 0 ? sum >> shift : 0;
        }
    }
}

void BitNetMCU_maxpool2(const int32_t *input, uint32_t size, int32_t *output)
{
    for (uint32_t y = 0; y < size; y += 2u, input += 2u * size) {
        for (uint32_t x = 0; x < size; x += 2u) {
            int32_t m = input[x];
            if (input[x + 1u] > m) m = input[x + 1u];
            if (input[size + x] > m) m = input[size + x];
            if (input[size + x + 1u] > m) m = input[size + x + 1u];
            *output++ = m;
        }
    }
}

uint32_t BitNetMCU_argmax(const int32_t *values, uint32_t n)
{
    uint32_t best = 0;
    for (uint32_t i = 1; i < n; i++)
        if (values[i] > values[best]) best = i;
    return best;
}
