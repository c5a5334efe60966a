#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <vector>

namespace kscope::cli {
// Registers capture, calibrate and vectors; each runner returns -1 when its command was not the one given.
void add_interp_commands(CLI::App& app, std::vector<std::function<int()>>& runners);
void add_trait_commands(CLI::App& app, std::vector<std::function<int()>>& runners);
void add_serve_command(CLI::App& app, std::vector<std::function<int()>>& runners);
}
