#pragma once

#include <string>

#include "absl/time/time.h"

namespace tokenbroker {

// Blocks SIGTERM and SIGINT for the process; call before starting any thread.
void BlockStopSignals();
// What a daemon sets before starting any thread: BlockStopSignals, and Abseil's lock-order cycle
// detection (a graph lookup per lock) on in debug builds — the ASan + UBSan tree the end-to-end
// tests run in `make test` — where a cycle aborts, off in release.
void PrepareDaemonProcess();
// Waits up to `timeout` for SIGTERM or SIGINT; returns its name, or "" on timeout.
std::string WaitForStopSignal(absl::Duration timeout);

}  // namespace tokenbroker
