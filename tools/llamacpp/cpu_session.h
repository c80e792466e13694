// What kvscope's llama.cpp tools share: token ids from a comma-separated argument, and a model
// plus a CPU-only context sized for one sequence (included by greedy_ids.cpp and logits.cpp).
#pragma once

#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

static std::vector<llama_token> parse_ids(const char * text) {
    std::vector<llama_token> ids;
    std::stringstream ss(text);
    for (std::string item; std::getline(ss, item, ',');) {
        ids.push_back((llama_token) std::atoi(item.c_str()));
    }
    return ids;
}

// The model at `path` (no GPU layers) and a context of n_ctx positions whose batches hold up to
// n_batch tokens, on n_threads threads; false (after a message on stderr) if either fails.
static bool open_cpu_session(const char * path, int32_t n_ctx, int32_t n_batch, int n_threads,
                             llama_model ** model, llama_context ** ctx) {
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    *model = llama_model_load_from_file(path, mp);
    if (*model == NULL) {
        fprintf(stderr, "unable to load %s\n", path);
        return false;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n_batch;
    cp.n_ubatch = n_batch;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    *ctx = llama_init_from_model(*model, cp);
    if (*ctx == NULL) {
        fprintf(stderr, "failed to create the context\n");
        return false;
    }
    return true;
}
