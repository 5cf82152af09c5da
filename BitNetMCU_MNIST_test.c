/*
 * Host test: runs the images of BitNetMCU_MNIST_test_data.h (written by test_inference.py) through
 * the exported model and exits non-zero if any prediction differs from the expected one.
 *
 *   make ctest    (or: cc -std=c99 -I. BitNetMCU_MNIST_test.c BitNetMCU_inference.c && ./a.out)
 */
#include <stdio.h>

#include "BitNetMCU_model.h"
#include "BitNetMCU_MNIST_test_data.h"

#ifndef BITNETMCU_MODEL_FORMAT
#error "BitNetMCU_model.h names no format: it predates this engine; export the model again with exportquant.py"
#endif
#if BITNETMCU_MODEL_INPUTS != 256
#error "the test data holds 16x16 images"
#endif
#if BITNETMCU_TEST_MODEL_FINGERPRINT != BITNETMCU_MODEL_FINGERPRINT
#error "BitNetMCU_MNIST_test_data.h was made for another model header: run test_inference.py to refresh it"
#endif

int main(void)
{
    const uint8_t *code = BitNetMCU_test_images;
    int8_t image[BITNETMCU_MODEL_INPUTS];
    uint32_t mismatches = 0, correct = 0;
    for (uint32_t i = 0; i < BITNETMCU_TEST_IMAGES; i++) {
        int32_t logits[BITNETMCU_MODEL_CLASSES];
        code = BitNetMCU_unpack_test_image(code, image, BITNETMCU_MODEL_INPUTS);
        uint32_t predicted = BitNetMCU_model_infer(image, logits);
        if (predicted != (uint32_t)BitNetMCU_test_predictions[i]) {
            mismatches++;
            printf("image %u: predicted %u, expected %d\n", (unsigned)i, (unsigned)predicted,
                   BitNetMCU_test_predictions[i]);
        }
        correct += predicted == (uint32_t)BitNetMCU_test_labels[i];
    }
    printf("%u images: %u correct (%.2f%%), %u mismatches against the Python reference\n",
           (unsigned)BITNETMCU_TEST_IMAGES, (unsigned)correct, 100.0 * correct / BITNETMCU_TEST_IMAGES,
           (unsigned)mismatches);
    return mismatches ? 1 : 0;
}
