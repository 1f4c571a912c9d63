// The UCX transport is a separate library, linked against libucp, that Python loads with ctypes
// (portep.native.engine.transport_ops("ucx")); this module init only lets
// `import portep.native._ucx` locate it.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef ucx_module = {
    PyModuleDef_HEAD_INIT, "_ucx",
    "portep's UCX transport (libucp) for the compiled proxy; loaded with ctypes by portep.native.engine", -1, NULL,
    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__ucx(void) { return PyModule_Create(&ucx_module); }
