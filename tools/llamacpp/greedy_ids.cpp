// kvscope-greedy-ids: greedy decoding with llama.cpp from token ids to token ids, so that
// `kvscope bench --peers llamacpp` compares llama.cpp's tokens one to one with kvscope's
// (llama-simple/llama-cli take text and print text). Built by `make llamacpp` against the
// libllama of the pinned llama-cpp-python sdist; modelled on its examples/simple/simple.cpp.
//
//   kvscope-greedy-ids MODEL.gguf N_PREDICT N_THREADS ID,ID,...
// prints the N_PREDICT generated ids on one line, space-separated (end-of-generation tokens do
// not stop it: kvscope's bench runs with ignore_eos too).
#include "cpu_session.h"

#include <clocale>
#include <cstdio>
#include <cstdlib>
#include <vector>

static void set_tokens(llama_batch_ext * batch, const llama_token * toks, int32_t n, llama_pos pos0) {
    llama_batch_ext_clear(batch);
    for (int32_t i = 0; i < n; ++i) {
        const int32_t idx = llama_batch_ext_add_token(batch, 0, toks[i]);
        const llama_pos pos = pos0 + i;
        llama_batch_ext_set_pos(batch, idx, &pos);
    }
    llama_batch_ext_set_output_logits(batch, n - 1, true);
}

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL.gguf N_PREDICT N_THREADS ID,ID,...\n", argv[0]);
        return 2;
    }
    const int n_predict = std::atoi(argv[2]);
    const int n_threads = std::atoi(argv[3]);
    const std::vector<llama_token> prompt = parse_ids(argv[4]);
    if (prompt.empty() || n_predict < 1 || n_threads < 1) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    llama_model * model = NULL;
    llama_context * ctx = NULL;
    const int32_t n_ctx = (int32_t) prompt.size() + n_predict;
    if (!open_cpu_session(argv[1], n_ctx, (int32_t) prompt.size(), n_threads, &model, &ctx)) {
        return 1;
    }
    llama_sampler * smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
    llama_batch_ext * batch = llama_batch_ext_init(ctx);
    set_tokens(batch, prompt.data(), (int32_t) prompt.size(), 0);
    llama_pos pos = 0;
    int32_t n_tokens = (int32_t) prompt.size();
    for (int i = 0; i < n_predict; ++i) {
        if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch)) {
            fprintf(stderr, "decode failed at step %d\n", i);
            return 1;
        }
        pos += n_tokens;
        llama_token id = llama_sampler_sample(smpl, ctx, -1);
        printf(i ? " %d" : "%d", id);
        set_tokens(batch, &id, 1, pos);
        n_tokens = 1;
    }
    printf("\n");
    llama_batch_ext_free(batch);
    llama_sampler_free(smpl);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
