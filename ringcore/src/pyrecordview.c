/* SPDX-License-Identifier: MIT */
/*
 * The exporter behind the memoryviews consume_each() hands to its callback.
 * A bare PyMemoryView_FromMemory() view could be sliced or re-exported by
 * the callback and outlive it, pointing into ring memory that producers
 * reuse (or that close() unmaps). Exporting through this object counts every
 * view derived from the callback's one: consume_each() sees when any
 * survives the call and says so, and the ring refuses to close under them.
 */
#include "pyringcore.h"

RecordViewObject *record_view_new(RingObject *ring)
{
	RecordViewObject *self = PyObject_New(RecordViewObject, &RecordViewType);

	if (!self)
		return NULL;
	Py_INCREF(ring);
	self->ring = ring;
	self->data = NULL;
	self->size = 0;
	self->exports = 0;
	return self;
}

static void RecordView_dealloc(RecordViewObject *self)
{
	Py_DECREF(self->ring);
	PyObject_Free(self);
}

static int RecordView_getbuffer(RecordViewObject *self, Py_buffer *view,
				int flags)
{
	if (!self->data || !self->ring->ring.base) {
		PyErr_SetString(PyExc_BufferError,
				"a record view is valid only during its callback");
		return -1;
	}
	if (PyBuffer_FillInfo(view, (PyObject *)self, (void *)self->data,
			      self->size, 1, flags))
		return -1;
	self->exports++;
	self->ring->exports++;
	return 0;
}

static void RecordView_releasebuffer(RecordViewObject *self,
				     Py_buffer *Py_UNUSED(view))
{
	self->exports--;
	self->ring->exports--;
}

static PyBufferProcs RecordView_as_buffer = {
	.bf_getbuffer = (getbufferproc)RecordView_getbuffer,
	.bf_releasebuffer = (releasebufferproc)RecordView_releasebuffer,
};

PyTypeObject RecordViewType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "ringcore._RecordView",
	.tp_basicsize = sizeof(RecordViewObject),
	.tp_dealloc = (destructor)RecordView_dealloc,
	.tp_as_buffer = &RecordView_as_buffer,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Exporter of one record's bytes during a consume_each() "
		  "callback.",
};
