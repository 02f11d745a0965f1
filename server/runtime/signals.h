#pragma once

#include <string>

#include "absl/time/time.h"

namespace tokenbroker {

// Blocks SIGTERM and SIGINT for the process; call before starting any thread.
void BlockStopSignals();
// Waits up to `timeout` for SIGTERM or SIGINT; returns its name, or "" on timeout.
std::string WaitForStopSignal(absl::Duration timeout);

}  // namespace tokenbroker
