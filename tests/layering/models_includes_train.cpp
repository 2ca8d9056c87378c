// Compiled as a file of the models layer (tests/layering.cmake): models may not include train/, so this must
// fail to compile. The test passes when the compiler reports the include as not found.
#include "models/model.h"
#include "train/optimizer.h"
