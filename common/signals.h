// Clean shutdown on SIGINT/SIGTERM for servers: block the signals before any thread starts (so
// every thread inherits the mask), then wait for one synchronously on the main thread.
#ifndef MOE_COMMON_SIGNALS_H_
#define MOE_COMMON_SIGNALS_H_

namespace moe {

// Call first thing in main(), before any thread is created.
void BlockTerminationSignals();
// Blocks until SIGINT or SIGTERM arrives; returns the signal number.
int WaitForTerminationSignal();

}  // namespace moe

#endif  // MOE_COMMON_SIGNALS_H_
