// kvscope-logits: llama.cpp's next-token logits at every position of a token-id sequence
// (teacher-forced, one prefill), so that `kvscope quant-eval --peers llamacpp` compares
// llama.cpp's quantized GGUFs with its own full-precision one by KL / top-1 exactly as kvscope's
// formats are compared with kvscope's fp32. Built by `make llamacpp` beside kvscope-greedy-ids.
//
//   kvscope-logits MODEL.gguf N_THREADS OUT.f32 ID,ID,...
// writes n x n_vocab float32 (row i: the logits after token i), little-endian, to OUT.f32.
#include "cpu_session.h"

#include <clocale>
#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL.gguf N_THREADS OUT.f32 ID,ID,...\n", argv[0]);
        return 2;
    }
    const int n_threads = std::atoi(argv[2]);
    const std::vector<llama_token> ids = parse_ids(argv[4]);
    if (ids.empty() || n_threads < 1) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    const int32_t n = (int32_t) ids.size();
    llama_model * model = NULL;
    llama_context * ctx = NULL;
    if (!open_cpu_session(argv[1], n, n, n_threads, &model, &ctx)) {
        return 1;
    }
    llama_batch_ext * batch = llama_batch_ext_init(ctx);
    llama_batch_ext_clear(batch);
    for (int32_t i = 0; i < n; ++i) {
        const int32_t idx = llama_batch_ext_add_token(batch, 0, ids[i]);
        const llama_pos pos = i;
        llama_batch_ext_set_pos(batch, idx, &pos);
        llama_batch_ext_set_output_logits(batch, idx, true);
    }
    if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch)) {
        fprintf(stderr, "decode failed\n");
        return 1;
    }
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * out = std::fopen(argv[3], "wb");
    if (out == NULL) {
        fprintf(stderr, "cannot write %s\n", argv[3]);
        return 1;
    }
    for (int32_t i = 0; i < n; ++i) {
        const float * row = llama_get_logits_ith(ctx, i);
        if (row == NULL || std::fwrite(row, sizeof(float), n_vocab, out) != (size_t) n_vocab) {
            fprintf(stderr, "no logits for position %d\n", i);
            return 1;
        }
    }
    std::fclose(out);
    printf("%d %d\n", n, n_vocab);
    llama_batch_ext_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
