#pragma once
// The subcommands of the qlora tool; each returns the process exit code and throws qlora::Error on
// bad input.
int cmd_quantize(int argc, char** argv);
extern const char* quantize_usage;
int cmd_eval(int argc, char** argv);
extern const char* eval_usage;
int cmd_generate(int argc, char** argv);
extern const char* generate_usage;
int cmd_finetune(int argc, char** argv);
extern const char* finetune_usage;
int cmd_pretrain(int argc, char** argv);
extern const char* pretrain_usage;
int cmd_merge(int argc, char** argv);
extern const char* merge_usage;
