// qlora: the command-line tool. `qlora <command> [args]`; `qlora help` lists the commands.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "commands.hpp"
#include "qlora/core/error.hpp"

namespace {
void usage(std::FILE* to) {
  std::fprintf(to,
               "usage: qlora <command> [args]\n\n"
               "commands:\n"
               "  quantize IN OUT [options]   quantize a .safetensors file or Hugging Face folder to\n"
               "                              bitsandbytes NF4 / FP4 / int8 (qlora quantize --help)\n"
               "  eval --model DIR [options]  mean next-token loss of token ids or a text file, and the\n"
               "                              logits (qlora eval --help)\n"
               "  generate --model DIR [opts] continue a --prompt, greedy or sampled\n"
               "                              (qlora generate --help)\n"
               "  finetune --model DIR --data FILE [opts]   LoRA / QLoRA fine-tuning, saves a PEFT adapter\n"
               "                              (qlora finetune --help)\n"
               "  merge --model DIR --adapter DIR --out DIR  fold an adapter into the weights\n"
               "                              (qlora merge --help)\n"
               "  pretrain --model DIR --data FILE --out DIR  train every weight of a small model\n"
               "                              (qlora pretrain --help)\n");
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "help") || !std::strcmp(argv[1], "--help") ||
      !std::strcmp(argv[1], "-h")) {
    usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "quantize") return cmd_quantize(argc, argv);
    if (cmd == "eval") return cmd_eval(argc, argv);
    if (cmd == "generate") return cmd_generate(argc, argv);
    if (cmd == "finetune") return cmd_finetune(argc, argv);
    if (cmd == "merge") return cmd_merge(argc, argv);
    if (cmd == "pretrain") return cmd_pretrain(argc, argv);
    std::fprintf(stderr, "qlora: unknown command '%s'\n", cmd.c_str());
    usage(stderr);
    return 2;
  } catch (const qlora::Error& e) {
    std::fprintf(stderr, "qlora %s: error: %s\n", cmd.c_str(), e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qlora %s: internal error: %s\n", cmd.c_str(), e.what());
    return 3;
  }
}
