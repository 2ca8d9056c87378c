// OpenMP's wait policy for the CLI's long parallel runs on a shared machine.
#pragma once

namespace kiln::cli {

// OpenMP threads that spin while they wait for each other (libgomp's default) collapse when another process
// takes a core: a 2-thread step waits for a descheduled spinner. Passive waiting degrades in proportion instead
// (measured on the loaded 2-core machine: kiln serve, 1 stream 2.3 -> 6.0 tokens/s, 16 streams 6.8 -> 29.2;
// kiln sample, DiT-S/2 edm-heun, 7.5-8.1 -> 2.6-3.4 s). The policy is read when the runtime loads, so the command
// sets it and starts itself again, once, unless the environment already names one (OMP_WAIT_POLICY=active
// keeps spinning).
void prefer_passive_omp_wait();

}  // namespace kiln::cli
