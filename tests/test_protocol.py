"""Contract and staleness tests of the Flink.NET protocol modules.

The contract test compares the generated descriptors with a table of the
package, services, methods, field numbers and field types of Flink.NET's
JobManager protocol. Field names do not travel on the binary wire, so the
table is keyed by field number; names are compared ignoring case style only.
The staleness test regenerates every module and compares it byte for byte
with the committed one.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    ServiceDescriptor,
)

from protos import generate as protos_generate
from protos import (
    jobledger_events_pb2,
    jobledger_services_pb2,
    jobledger_types_pb2,
    jobmanager_internal_pb2,
    jobmanager_internal_pb2_grpc,
)

PACKAGE = "FlinkDotNet.Proto"
FILE = jobmanager_internal_pb2.DESCRIPTOR


class Field(NamedTuple):
    """One field of the contract. ``oneof`` is None outside a oneof."""

    number: int
    name: str
    type: str
    oneof: str | None = None


class Method(NamedTuple):
    """One RPC of the contract, with the streaming flags of both sides."""

    name: str
    request: str
    response: str
    client_streaming: bool = False
    server_streaming: bool = False


CONTRACT_SERVICES: dict[str, list[Method]] = {
    "JobManagerInternalService": [
        Method("SubmitJob", "SubmitJobRequest", "SubmitJobReply"),
        Method(
            "ReportStateCompletion",
            "ReportStateCompletionRequest",
            "ReportStateCompletionReply",
        ),
        Method(
            "RequestCheckpoint", "RequestCheckpointRequest", "RequestCheckpointReply"
        ),
        Method("RequestRecovery", "RequestRecoveryRequest", "RequestRecoveryReply"),
        Method(
            "ReportFailedCheckpoint",
            "ReportFailedCheckpointRequest",
            "ReportFailedCheckpointResponse",
        ),
        Method(
            "ReportTaskStartupFailure",
            "ReportTaskStartupFailureRequest",
            "ReportTaskStartupFailureResponse",
        ),
        Method("Heartbeat", "JobManagerHeartbeatRequest", "JobManagerHeartbeatReply"),
    ],
    "TaskManagerRegistration": [
        Method(
            "RegisterTaskManager",
            "RegisterTaskManagerRequest",
            "RegisterTaskManagerResponse",
        ),
        Method("SendHeartbeat", "HeartbeatRequest", "HeartbeatResponse"),
        Method(
            "AcknowledgeCheckpoint",
            "AcknowledgeCheckpointRequest",
            "AcknowledgeCheckpointResponse",
        ),
    ],
    "TaskManagerCheckpointing": [
        Method(
            "TriggerTaskCheckpoint",
            "TriggerCheckpointRequest",
            "TriggerCheckpointResponse",
        ),
    ],
    "TaskExecution": [
        Method("DeployTask", "TaskDeploymentDescriptor", "DeployTaskResponse"),
    ],
    "DataExchangeService": [
        Method(
            "ExchangeData",
            "UpstreamPayload",
            "DownstreamPayload",
            client_streaming=True,
            server_streaming=True,
        ),
    ],
}

# Types are written as in a .proto file: scalars by their proto name, message
# and enum types of this package by their short name, other types by their
# full name, and "repeated X" or "map<K, V>" for the composite labels.
CONTRACT_MESSAGES: dict[str, list[Field]] = {
    # JobManagerInternalService
    "SubmitJobRequest": [Field(1, "job_graph", "JobGraph")],
    "SubmitJobReply": [
        Field(1, "success", "bool"),
        Field(2, "job_id", "string"),
        Field(3, "message", "string"),
    ],
    "ReportStateCompletionRequest": [
        Field(1, "checkpoint_id", "int64"),
        Field(2, "operator_instance_id", "string"),
        Field(3, "state_location", "string"),
        Field(4, "input_offsets", "map<string, int64>"),
    ],
    "ReportStateCompletionReply": [Field(1, "ack", "bool")],
    "RequestCheckpointRequest": [Field(1, "checkpoint_id", "int64")],
    "RequestCheckpointReply": [Field(1, "accepted", "bool")],
    "RequestRecoveryRequest": [
        Field(1, "job_id", "string"),
        Field(2, "checkpoint_id", "int64"),
    ],
    "RequestRecoveryReply": [Field(1, "recovery_initiated", "bool")],
    "ReportFailedCheckpointRequest": [
        Field(1, "job_id", "string"),
        Field(2, "checkpoint_id", "int64"),
        Field(3, "job_vertex_id", "string"),
        Field(4, "subtask_index", "int32"),
        Field(5, "failure_reason", "string"),
        Field(6, "task_manager_id", "string"),
    ],
    "ReportFailedCheckpointResponse": [Field(1, "acknowledged", "bool")],
    "ReportTaskStartupFailureRequest": [
        Field(1, "job_id", "string"),
        Field(2, "job_vertex_id", "string"),
        Field(3, "subtask_index", "int32"),
        Field(4, "task_manager_id", "string"),
        Field(5, "failure_reason", "string"),
    ],
    "ReportTaskStartupFailureResponse": [Field(1, "acknowledged", "bool")],
    "JobManagerHeartbeatRequest": [
        Field(1, "job_id", "string"),
        Field(2, "operator_instance_id", "string"),
        Field(3, "health_status", "string"),
    ],
    "JobManagerHeartbeatReply": [Field(1, "ack", "bool")],
    # TaskManagerRegistration
    "RegisterTaskManagerRequest": [
        Field(1, "task_manager_id", "string"),
        Field(2, "address", "string"),
        Field(3, "port", "int32"),
    ],
    "RegisterTaskManagerResponse": [
        Field(1, "success", "bool"),
        Field(2, "job_manager_id", "string"),
    ],
    "TaskMetricData": [
        Field(1, "task_id", "string"),
        Field(2, "records_in", "int64"),
        Field(3, "records_out", "int64"),
    ],
    "HeartbeatRequest": [
        Field(1, "task_manager_id", "string"),
        Field(2, "task_metrics", "repeated TaskMetricData"),
    ],
    "HeartbeatResponse": [Field(1, "acknowledged", "bool")],
    "AcknowledgeCheckpointRequest": [
        Field(1, "job_manager_id", "string"),
        Field(2, "job_id", "string"),
        Field(3, "checkpoint_id", "int64"),
        Field(4, "task_manager_id", "string"),
        Field(5, "job_vertex_id", "string"),
        Field(6, "subtask_index", "int32"),
        Field(7, "snapshot_handle", "string"),
        Field(8, "source_offsets", "map<string, int64>"),
        Field(9, "snapshot_size", "uint64"),
        Field(10, "duration", "uint64"),
    ],
    "AcknowledgeCheckpointResponse": [Field(1, "success", "bool")],
    # The worker's services
    "TriggerCheckpointRequest": [
        Field(1, "job_manager_id", "string"),
        Field(2, "job_id", "string"),
        Field(3, "checkpoint_id", "int64"),
        Field(4, "checkpoint_timestamp", "int64"),
    ],
    "TriggerCheckpointResponse": [Field(1, "acknowledged", "bool")],
    "OperatorInput": [
        Field(1, "source_vertex_id", "string"),
        Field(2, "upstream_job_vertex_id", "string"),
        Field(3, "upstream_subtask_index", "int32"),
    ],
    "OperatorOutput": [
        Field(1, "target_vertex_id", "string"),
        Field(2, "target_task_endpoint", "string"),
        Field(3, "target_specific_subtask_index", "int32"),
    ],
    "OutputEdgeKeyingInfo": [
        Field(1, "target_job_vertex_id", "string"),
        Field(2, "serialized_key_selector", "string"),
        Field(3, "key_type_name", "string"),
        Field(4, "downstream_parallelism", "int32"),
    ],
    "InputKeyingInfo": [
        Field(1, "serialized_key_selector", "string"),
        Field(2, "key_type_name", "string"),
    ],
    "ChainedOperatorInfo": [
        Field(1, "original_job_vertex_id", "string"),
        Field(2, "fully_qualified_operator_name", "string"),
        Field(3, "operator_configuration", "bytes"),
        Field(4, "input_type_name", "string"),
        Field(5, "output_type_name", "string"),
    ],
    "TaskDeploymentDescriptor": [
        Field(1, "job_graph_job_id", "string"),
        Field(2, "job_vertex_id", "string"),
        Field(3, "subtask_index", "int32"),
        Field(4, "task_name", "string"),
        Field(5, "fully_qualified_operator_name", "string"),
        Field(6, "operator_configuration", "bytes"),
        Field(7, "inputs", "repeated OperatorInput"),
        Field(8, "outputs", "repeated OperatorOutput"),
        Field(9, "input_type_name", "string"),
        Field(10, "output_type_name", "string"),
        Field(11, "input_serializer_type_name", "string"),
        Field(12, "output_serializer_type_name", "string"),
        Field(13, "output_keying_info", "repeated OutputEdgeKeyingInfo"),
        Field(14, "is_recovery", "bool"),
        Field(15, "recovery_checkpoint_id", "int64"),
        Field(16, "recovery_snapshot_handle", "string"),
        Field(17, "recovery_source_offsets", "map<string, int64>"),
        Field(18, "input_keying_info", "repeated InputKeyingInfo"),
        Field(19, "chained_operator_info", "repeated ChainedOperatorInfo"),
    ],
    "DeployTaskResponse": [
        Field(1, "success", "bool"),
        Field(2, "message", "string"),
    ],
    "CheckpointBarrier": [
        Field(1, "checkpoint_id", "int64"),
        Field(2, "checkpoint_timestamp", "int64"),
    ],
    "Watermark": [Field(1, "timestamp", "int64")],
    "DataRecord": [
        Field(1, "target_job_vertex_id", "string"),
        Field(2, "target_subtask_index", "int32"),
        Field(3, "data_payload", "bytes", oneof="payload_type"),
        Field(4, "barrier_payload", "CheckpointBarrier", oneof="payload_type"),
        Field(5, "source_job_vertex_id", "string"),
        Field(6, "source_subtask_index", "int32"),
        Field(7, "watermark_payload", "Watermark", oneof="payload_type"),
        Field(8, "is_checkpoint_barrier", "bool"),
        Field(9, "checkpoint_options", "bytes"),
    ],
    "UpstreamPayload": [Field(1, "record", "DataRecord", oneof="payload_oneof")],
    "CreditUpdate": [Field(1, "credits_granted", "int32")],
    "DownstreamPayload": [
        Field(1, "credits", "CreditUpdate", oneof="payload_oneof"),
    ],
    # The job graph
    "OutputKeyingConfig": [
        Field(1, "key_selector_type_name", "string"),
        Field(2, "key_type_assembly_name", "string"),
    ],
    "OperatorDefinition": [
        Field(1, "fully_qualified_name", "string"),
        Field(2, "configuration", "google.protobuf.Struct"),
    ],
    "JobVertex": [
        Field(1, "id", "string"),
        Field(2, "name", "string"),
        Field(3, "operator_definition", "OperatorDefinition"),
        Field(4, "parallelism", "int32"),
        Field(5, "vertex_type", "VertexType"),
        Field(6, "input_type_name", "string"),
        Field(7, "output_type_name", "string"),
        Field(8, "input_serializer_type_name", "string"),
        Field(9, "output_serializer_type_name", "string"),
        Field(10, "input_edge_ids", "repeated string"),
        Field(11, "output_edge_ids", "repeated string"),
        Field(12, "output_edge_keying", "map<string, OutputKeyingConfig>"),
        Field(13, "chained_operators", "repeated OperatorDefinition"),
    ],
    "JobEdge": [
        Field(1, "id", "string"),
        Field(2, "source_vertex_id", "string"),
        Field(3, "target_vertex_id", "string"),
        Field(4, "shuffle_mode", "ShuffleMode"),
        Field(5, "data_type_name", "string"),
        Field(6, "serializer_type_name", "string"),
        Field(7, "output_keying_config", "OutputKeyingConfig"),
    ],
    "JobGraph": [
        Field(1, "job_name", "string"),
        Field(2, "status", "string"),
        Field(3, "submission_time", "google.protobuf.Timestamp"),
        Field(4, "vertices", "repeated JobVertex"),
        Field(5, "edges", "repeated JobEdge"),
        Field(6, "serializer_type_registrations", "map<string, string>"),
    ],
}

CONTRACT_ENUMS: dict[str, dict[int, str]] = {
    "VertexType": {0: "SOURCE", 1: "OPERATOR", 2: "SINK"},
    "ShuffleMode": {0: "FORWARD", 1: "BROADCAST", 2: "RESCALE", 3: "HASH"},
}

# Fields that jobledger adds to contract messages, at numbers the contract
# leaves free, so that Flink.NET peers skip them as unknown fields.
JOBLEDGER_ADDITIONS: dict[str, list[Field]] = {
    "RequestCheckpointRequest": [Field(2, "job_id", "string")],
    "RegisterTaskManagerRequest": [Field(4, "slots", "int32")],
    "HeartbeatResponse": [Field(2, "leader_epoch", "int64")],
    "ReportTaskStartupFailureRequest": [
        Field(6, "attempt", "int32"),
        Field(7, "unrecoverable", "bool"),
    ],
}

# The generated modules that protoc writes for each .proto file.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")

_SCALAR_NAMES = {
    getattr(FieldDescriptor, name): name.removeprefix("TYPE_").lower()
    for name in dir(FieldDescriptor)
    if name.startswith("TYPE_")
}


# ------------------------------------------------------------ helpers


def _normalized(name: str) -> str:
    """Return ``name`` without case or underscores, so job_id == JobId."""
    return name.replace("_", "").lower()


def _type_name(full_name: str) -> str:
    return full_name.removeprefix(PACKAGE + ".")


def _element_type(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return _type_name(field.message_type.full_name)
    if field.enum_type is not None:
        return _type_name(field.enum_type.full_name)
    return _SCALAR_NAMES[field.type]


def describe_type(field: FieldDescriptor) -> str:
    """Render a field's type in the notation of the contract table."""
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key = _element_type(entry.fields_by_name["key"])
        value = _element_type(entry.fields_by_name["value"])
        return f"map<{key}, {value}>"
    if field.is_repeated:
        return f"repeated {_element_type(field)}"
    return _element_type(field)


def _proto3_optional_fields(message: Descriptor) -> set[int]:
    proto = descriptor_pb2.DescriptorProto()
    message.CopyToProto(proto)
    return {field.number for field in proto.field if field.proto3_optional}


def real_oneof(field: FieldDescriptor) -> str | None:
    """Return the oneof a field belongs to, ignoring proto3 ``optional``.

    A proto3 ``optional`` field sits in a synthetic oneof of its own, which
    changes neither the wire format nor the field's meaning.
    """
    oneof = field.containing_oneof
    if oneof is None:
        return None
    message = field.containing_type
    if message is not None and field.number in _proto3_optional_fields(message):
        return None
    return str(oneof.name)


def _message(name: str) -> Descriptor:
    message = FILE.message_types_by_name.get(name)
    assert message is not None, (
        f"message {PACKAGE}.{name} of the contract is missing from "
        "protos/jobmanager_internal.proto"
    )
    return message


def _service(name: str) -> ServiceDescriptor:
    service = FILE.services_by_name.get(name)
    assert service is not None, (
        f"service {PACKAGE}.{name} of the contract is missing from "
        "protos/jobmanager_internal.proto"
    )
    return service


def _enum(name: str) -> EnumDescriptor:
    enum = FILE.enum_types_by_name.get(name)
    assert enum is not None, (
        f"enum {PACKAGE}.{name} of the contract is missing from "
        "protos/jobmanager_internal.proto"
    )
    return enum


class RecordingChannel:
    """A stand-in for grpc.Channel that records the paths a stub calls."""

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}

    def _register(self, kind: str, path: str) -> object:
        self.paths[path] = kind
        return object()

    def unary_unary(self, path: str, **kwargs: Any) -> object:
        return self._register("unary_unary", path)

    def unary_stream(self, path: str, **kwargs: Any) -> object:
        return self._register("unary_stream", path)

    def stream_unary(self, path: str, **kwargs: Any) -> object:
        return self._register("stream_unary", path)

    def stream_stream(self, path: str, **kwargs: Any) -> object:
        return self._register("stream_stream", path)


class RecordingServer:
    """A stand-in for grpc.Server that records the handlers a servicer adds."""

    def __init__(self) -> None:
        self.registered: dict[str, dict[str, Any]] = {}
        self.generic_handlers: list[Any] = []

    def add_generic_rpc_handlers(self, handlers: tuple[Any, ...]) -> None:
        self.generic_handlers.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, Any]
    ) -> None:
        self.registered[service] = handlers


def _streaming_kind(client_streaming: bool, server_streaming: bool) -> str:
    client = "stream" if client_streaming else "unary"
    server = "stream" if server_streaming else "unary"
    return f"{client}_{server}"


# ------------------------------------------------------------ file


def test_contract_package_and_syntax() -> None:
    proto = descriptor_pb2.FileDescriptorProto()
    FILE.CopyToProto(proto)
    assert proto.package == PACKAGE, (
        f"protos/jobmanager_internal.proto declares package {proto.package!r}; "
        f"the contract requires {PACKAGE!r}, which is part of every HTTP/2 path"
    )
    assert proto.syntax == "proto3", (
        f"protos/jobmanager_internal.proto uses syntax {proto.syntax!r}; "
        "the contract requires proto3"
    )


def test_contract_package_in_one_file() -> None:
    # Another file in the contract package could add services or messages
    # that the checks below never see.
    for module in (jobledger_events_pb2, jobledger_services_pb2, jobledger_types_pb2):
        assert module.DESCRIPTOR.package != PACKAGE, (
            f"{module.DESCRIPTOR.name} declares package {PACKAGE}; jobledger's "
            "own messages and services belong in the jobledger.v1 package"
        )


def test_contract_package_declares_no_extras() -> None:
    extra_services = set(FILE.services_by_name) - set(CONTRACT_SERVICES)
    extra_messages = set(FILE.message_types_by_name) - set(CONTRACT_MESSAGES)
    extra_enums = set(FILE.enum_types_by_name) - set(CONTRACT_ENUMS)
    assert not extra_services, (
        f"services {sorted(extra_services)} are not in the contract; put "
        "jobledger's own services in the jobledger.v1 package"
    )
    assert not extra_messages, (
        f"messages {sorted(extra_messages)} are not in the contract; put "
        "jobledger's own messages in the jobledger.v1 package"
    )
    assert not extra_enums, (
        f"enums {sorted(extra_enums)} are not in the contract; put "
        "jobledger's own enums in the jobledger.v1 package"
    )


# ------------------------------------------------------------ services


@pytest.mark.parametrize("service_name", sorted(CONTRACT_SERVICES))
def test_service_methods(service_name: str) -> None:
    service = _service(service_name)
    expected = CONTRACT_SERVICES[service_name]

    assert service.full_name == f"{PACKAGE}.{service_name}"
    assert {method.name for method in service.methods} == {
        method.name for method in expected
    }, f"service {service_name}: the set of methods differs from the contract"

    for method in expected:
        generated = service.methods_by_name[method.name]
        where = f"method {service_name}.{method.name}"
        assert _type_name(generated.input_type.full_name) == method.request, (
            f"{where}: request is {generated.input_type.full_name}, "
            f"the contract says {PACKAGE}.{method.request}"
        )
        assert _type_name(generated.output_type.full_name) == method.response, (
            f"{where}: response is {generated.output_type.full_name}, "
            f"the contract says {PACKAGE}.{method.response}"
        )
        assert generated.client_streaming == method.client_streaming, (
            f"{where}: client_streaming is {generated.client_streaming}, "
            f"the contract says {method.client_streaming}"
        )
        assert generated.server_streaming == method.server_streaming, (
            f"{where}: server_streaming is {generated.server_streaming}, "
            f"the contract says {method.server_streaming}"
        )


@pytest.mark.parametrize("service_name", sorted(CONTRACT_SERVICES))
def test_stub_paths(service_name: str) -> None:
    channel = RecordingChannel()
    getattr(jobmanager_internal_pb2_grpc, f"{service_name}Stub")(channel)

    expected = {
        f"/{PACKAGE}.{service_name}/{method.name}": _streaming_kind(
            method.client_streaming, method.server_streaming
        )
        for method in CONTRACT_SERVICES[service_name]
    }
    assert set(channel.paths) == set(expected), (
        f"{service_name}Stub calls paths {sorted(channel.paths)}, "
        f"the contract has {sorted(expected)}"
    )
    for path, kind in expected.items():
        assert channel.paths[path] == kind, (
            f"{service_name}Stub calls {path} as {channel.paths[path]}, "
            f"the contract makes it {kind}"
        )


@pytest.mark.parametrize("service_name", sorted(CONTRACT_SERVICES))
def test_servicer_registration(service_name: str) -> None:
    server = RecordingServer()
    servicer = getattr(jobmanager_internal_pb2_grpc, f"{service_name}Servicer")()
    add = getattr(jobmanager_internal_pb2_grpc, f"add_{service_name}Servicer_to_server")
    add(servicer, server)

    full_name = f"{PACKAGE}.{service_name}"
    assert set(server.registered) == {full_name}, (
        f"add_{service_name}Servicer_to_server registers {sorted(server.registered)}, "
        f"expected {full_name}"
    )
    handlers = server.registered[full_name]
    for method in CONTRACT_SERVICES[service_name]:
        handler = handlers.get(method.name)
        where = f"servicer handler /{full_name}/{method.name}"
        assert handler is not None, f"{where} is not registered"
        assert handler.request_streaming == method.client_streaming, (
            f"{where}: request_streaming is {handler.request_streaming}, "
            f"the contract says {method.client_streaming}"
        )
        assert handler.response_streaming == method.server_streaming, (
            f"{where}: response_streaming is {handler.response_streaming}, "
            f"the contract says {method.server_streaming}"
        )


# ------------------------------------------------------------ messages


@pytest.mark.parametrize("message_name", sorted(CONTRACT_MESSAGES))
def test_message_fields(message_name: str) -> None:
    message = _message(message_name)
    for field in CONTRACT_MESSAGES[message_name]:
        where = f"{message_name}.{field.name} = {field.number}"
        generated = message.fields_by_number.get(field.number)
        assert generated is not None, (
            f"{where}: no field has number {field.number}; the contract "
            f"requires {field.type} {field.name} = {field.number}"
        )
        assert describe_type(generated) == field.type, (
            f"{where}: the generated field {generated.name} has type "
            f"{describe_type(generated)}, the contract says {field.type}"
        )
        # The contract's fields of one oneof share a generated oneof, and its
        # other fields are in none; the oneof's name is not on the wire.
        if field.oneof is None:
            assert real_oneof(generated) is None, (
                f"{where}: the generated field is in oneof "
                f"{real_oneof(generated)}, the contract has it outside any oneof"
            )
        else:
            assert real_oneof(generated) is not None, (
                f"{where}: the generated field is in no oneof, the contract "
                f"puts it in oneof {field.oneof}"
            )


@pytest.mark.parametrize("message_name", sorted(CONTRACT_MESSAGES))
def test_message_oneof_groups(message_name: str) -> None:
    message = _message(message_name)
    groups: dict[str, set[str | None]] = {}
    for field in CONTRACT_MESSAGES[message_name]:
        generated = message.fields_by_number.get(field.number)
        if field.oneof is not None and generated is not None:
            groups.setdefault(field.oneof, set()).add(real_oneof(generated))

    for contract_oneof, generated_oneofs in groups.items():
        assert len(generated_oneofs) == 1, (
            f"{message_name}: the fields of contract oneof {contract_oneof} are "
            f"spread over generated oneofs {sorted(map(str, generated_oneofs))}"
        )
    mapped = [next(iter(oneofs)) for oneofs in groups.values()]
    assert len(set(mapped)) == len(mapped), (
        f"{message_name}: separate contract oneofs {sorted(groups)} share one "
        "generated oneof"
    )


@pytest.mark.parametrize("message_name", sorted(CONTRACT_MESSAGES))
def test_field_names_match_contract(message_name: str) -> None:
    # Two fields of one type swapped between their numbers keep every number
    # and type but break the wire meaning, and only the names show it.
    message = _message(message_name)
    for field in CONTRACT_MESSAGES[message_name]:
        generated = message.fields_by_number.get(field.number)
        if generated is None:
            continue  # test_message_fields reports the missing number.
        assert _normalized(generated.name) == _normalized(field.name), (
            f"{message_name} field {field.number} is named {generated.name}, the "
            f"contract calls it {field.name}; names may differ in case style only"
        )


@pytest.mark.parametrize("message_name", sorted(CONTRACT_MESSAGES))
def test_additions_avoid_contract_numbers(message_name: str) -> None:
    message = _message(message_name)
    contract = {field.number: field for field in CONTRACT_MESSAGES[message_name]}
    contract_names = {_normalized(field.name) for field in contract.values()}
    for generated in message.fields:
        if _normalized(generated.name) in contract_names:
            continue
        contract_field = contract.get(generated.number)
        assert contract_field is None, (
            f"{message_name}.{generated.name} is not in the contract but uses "
            f"number {generated.number}, which the contract gives to "
            f"{contract_field.type} {contract_field.name}; give the addition an "
            "unused number"
        )


@pytest.mark.parametrize(
    ("message_name", "addition"),
    [
        (message_name, addition)
        for message_name, additions in sorted(JOBLEDGER_ADDITIONS.items())
        for addition in additions
    ],
)
def test_jobledger_additions(message_name: str, addition: Field) -> None:
    contract_numbers = {field.number for field in CONTRACT_MESSAGES[message_name]}
    assert addition.number not in contract_numbers, (
        f"{message_name}.{addition.name} = {addition.number} collides with a "
        "contract field"
    )
    generated = _message(message_name).fields_by_number.get(addition.number)
    where = f"{message_name}.{addition.name} = {addition.number}"
    assert generated is not None, f"{where}: no field has number {addition.number}"
    assert _normalized(generated.name) == _normalized(addition.name), (
        f"{where}: field {addition.number} is named {generated.name}"
    )
    assert describe_type(generated) == addition.type, (
        f"{where}: the generated field has type {describe_type(generated)}, "
        f"expected {addition.type}"
    )


# ------------------------------------------------------------ enums


@pytest.mark.parametrize("enum_name", sorted(CONTRACT_ENUMS))
def test_enum_values(enum_name: str) -> None:
    enum = _enum(enum_name)
    for number, name in CONTRACT_ENUMS[enum_name].items():
        generated = enum.values_by_number.get(number)
        assert generated is not None, (
            f"enum {enum_name}: no value has number {number}; the contract "
            f"requires {name} = {number}"
        )
        assert generated.name == name, (
            f"enum {enum_name}: value {number} is named {generated.name}, "
            f"the contract calls it {name}"
        )


# ------------------------------------------------------------ staleness


def _committed_generated_files() -> Iterator[Path]:
    for suffix in GENERATED_SUFFIXES:
        yield from protos_generate.PROTOS_DIR.glob(f"*{suffix}")


def _source_stem(generated_name: str) -> str:
    return re.sub(r"_pb2(_grpc)?\.pyi?$", "", generated_name)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generate every module into a temporary folder and return its protos/."""
    out = tmp_path_factory.mktemp("generated")
    protos_generate.generate(out)
    return out / "protos"


def test_every_proto_has_generated_files() -> None:
    committed = {path.name for path in _committed_generated_files()}
    for source in protos_generate.proto_files():
        for suffix in GENERATED_SUFFIXES:
            name = source.stem + suffix
            assert name in committed, (
                f"protos/{source.name} has no committed protos/{name}; "
                "run `make protos` and commit the output"
            )


def test_every_generated_file_has_proto() -> None:
    sources = {path.stem for path in protos_generate.proto_files()}
    for path in _committed_generated_files():
        assert _source_stem(path.name) in sources, (
            f"protos/{path.name} has no source protos/{_source_stem(path.name)}"
            ".proto; delete it or restore the .proto, then run `make protos`"
        )


def test_protoc_writes_only_committed_files(regenerated: Path) -> None:
    committed = {path.name for path in _committed_generated_files()}
    generated = {path.name for path in regenerated.iterdir()}
    assert generated <= committed, (
        f"protoc writes {sorted(generated - committed)}, which are not "
        "committed; run `make protos` and commit the output"
    )


def test_generated_files_match_protos(regenerated: Path) -> None:
    committed = {path.name: path for path in _committed_generated_files()}
    generated = {
        path.name: path for path in regenerated.iterdir() if path.name in committed
    }
    stale = [
        name
        for name, path in sorted(generated.items())
        if path.read_bytes() != committed[name].read_bytes()
    ]
    if not stale:
        return
    first = stale[0]
    diff = difflib.unified_diff(
        committed[first].read_text(errors="replace").splitlines(),
        generated[first].read_text(errors="replace").splitlines(),
        f"protos/{first} (committed)",
        f"protos/{first} (generated)",
        lineterm="",
        n=1,
    )
    # The serialized descriptor is one very long line, so lines are cut.
    excerpt = "\n".join(line[:160] for line in list(diff)[:20])
    pytest.fail(
        f"stale generated modules {stale}: they differ from what protoc writes "
        f"from the .proto files; run `make protos` and commit the output\n"
        f"{excerpt}"
    )
