/* SPDX-License-Identifier: MIT */
/*
 * Argument parsing for METH_FASTCALL | METH_KEYWORDS methods. The hot
 * methods (output, reserve) take one or two arguments; this keeps them off
 * PyArg_ParseTupleAndKeywords, which builds a tuple and a dict per call.
 */
#include "pyringcore.h"

/*
 * Fill out[i] (borrowed, or NULL when not given) for each name in the
 * NULL-terminated names[], from positional args then keywords.
 */
int fast_args(const char *fname, PyObject *const *args, Py_ssize_t nargs,
	      PyObject *kwnames, const char *const *names, Py_ssize_t nrequired,
	      PyObject **out)
{
	Py_ssize_t nnames = 0, i, j, nkw;

	while (names[nnames])
		nnames++;
	if (nargs > nnames) {
		PyErr_Format(PyExc_TypeError,
			     "%s() takes at most %zd arguments (%zd given)",
			     fname, nnames, nargs);
		return -1;
	}
	for (i = 0; i < nnames; i++)
		out[i] = i < nargs ? args[i] : NULL;
	nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
	for (j = 0; j < nkw; j++) {
		PyObject *key = PyTuple_GET_ITEM(kwnames, j);

		for (i = 0; i < nnames; i++)
			if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0)
				break;
		if (i == nnames) {
			PyErr_Format(PyExc_TypeError,
				     "%s() got an unexpected keyword argument '%U'",
				     fname, key);
			return -1;
		}
		if (out[i]) {
			PyErr_Format(PyExc_TypeError,
				     "%s() got multiple values for argument '%s'",
				     fname, names[i]);
			return -1;
		}
		out[i] = args[nargs + j];
	}
	for (i = 0; i < nrequired; i++)
		if (!out[i]) {
			PyErr_Format(PyExc_TypeError,
				     "%s() missing required argument '%s'",
				     fname, names[i]);
			return -1;
		}
	return 0;
}

int parse_flags(PyObject *obj, unsigned *flags)
{
	long v;

	*flags = 0;
	if (!obj)
		return 0;
	v = PyLong_AsLong(obj);
	if (v == -1 && PyErr_Occurred())
		return -1;
	if (v & ~(long)(RC_NO_WAKEUP | RC_FORCE_WAKEUP)) {
		PyErr_Format(PyExc_ValueError,
			     "invalid flags %ld: only NO_WAKEUP (1) and "
			     "FORCE_WAKEUP (2) are defined",
			     v);
		return -1;
	}
	*flags = (unsigned)v;
	return 0;
}
