// The engine is a plain C library that Python drives through ctypes (portep.native.engine); this
// module init only lets `import portep.native._engine` locate the built library.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT, "_engine",
    "portep's compiled data plane (streams, proxy, transports); loaded with ctypes by portep.native.engine", -1,
    NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__engine(void) { return PyModule_Create(&engine_module); }
