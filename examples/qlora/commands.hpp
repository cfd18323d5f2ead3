#pragma once
// The subcommands of the qlora tool; each returns the process exit code and throws qlora::Error on
// bad input.
int cmd_quantize(int argc, char** argv);
extern const char* quantize_usage;
int cmd_eval(int argc, char** argv);
extern const char* eval_usage;
int cmd_generate(int argc, char** argv);
extern const char* generate_usage;
