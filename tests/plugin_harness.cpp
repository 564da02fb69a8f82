// Drives the C++ W4A16MatMul plugin (plugins/libqvggt_plugins.so) through its TensorRT interfaces with no
// TensorRT runtime in the process: creator registration data, field parsing, serialization round trip,
// output types, format combinations, shape checks and the kernel's argument checks. Built and run by
// tests/test_cuda_compile.py against each TensorRT header version; prints "harness passed" on success.
#include "NvInferRuntime.h"
#include "w4a16_gemm.cuh"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

using namespace nvinfer1;

#define CHECK(condition)                                                   \
  do {                                                                     \
    if (!(condition)) {                                                    \
      std::fprintf(stderr, "FAILED (line %d): %s\n", __LINE__, #condition); \
      return 1;                                                            \
    }                                                                      \
  } while (0)

namespace {

struct Fields {
  int32_t k{2048}, n{8192}, groupSize{128}, bits{4};
  std::string layout{"kernel_v1"};
  std::string annotation{"frame.3"};  // a node annotation the parser passes along; the plugin ignores it
  std::vector<PluginField> list;
  PluginFieldCollection collection{};

  PluginFieldCollection const* make() {
    list = {PluginField("K", &k, PluginFieldType::kINT32, 1), PluginField("N", &n, PluginFieldType::kINT32, 1),
            PluginField("group_size", &groupSize, PluginFieldType::kINT32, 1),
            PluginField("bits", &bits, PluginFieldType::kINT32, 1),
            PluginField("layout", layout.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(layout.size() + 1)),
            PluginField("qvggt_block", annotation.c_str(), PluginFieldType::kCHAR,
                        static_cast<int32_t>(annotation.size() + 1))};
    collection.nbFields = static_cast<int32_t>(list.size());
    collection.fields = list.data();
    return &collection;
  }
};

// "K=2048 N=8192 group_size=128 bits=4 layout=kernel_v1": what a plugin would write into an engine.
std::string serialized(IPluginV3* plugin) {
  auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  PluginFieldCollection const* fields = runtime->getFieldsToSerialize();
  std::string text;
  for (int32_t i = 0; i < fields->nbFields; ++i) {
    PluginField const& field = fields->fields[i];
    text += std::string(text.empty() ? "" : " ") + field.name + "=";
    if (field.type == PluginFieldType::kINT32) text += std::to_string(*static_cast<int32_t const*>(field.data));
    if (field.type == PluginFieldType::kCHAR) text += static_cast<char const*>(field.data);
  }
  return text;
}

DynamicPluginTensorDesc tensor(DataType type, std::vector<int64_t> dims) {
  DynamicPluginTensorDesc desc{};
  desc.desc.type = type;
  desc.desc.format = TensorFormat::kLINEAR;
  desc.desc.dims.nbDims = static_cast<int32_t>(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) desc.desc.dims.d[i] = dims[i];
  return desc;
}

}  // namespace

int main() {
  int32_t count = 0;
  IPluginCreatorInterface* const* creators = getCreators(count);
  CHECK(count == 1 && creators[0] != nullptr);
  CHECK(std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
  auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
  CHECK(std::strcmp(creator->getPluginName(), "W4A16MatMul") == 0);
  CHECK(std::strcmp(creator->getPluginNamespace(), "qvggt") == 0);
  CHECK(std::strcmp(creator->getPluginVersion(), "1") == 0);
  PluginFieldCollection const* names = creator->getFieldNames();
  CHECK(names->nbFields == 5 && std::strcmp(names->fields[4].name, "layout") == 0 &&
        names->fields[4].type == PluginFieldType::kCHAR);

  // Field parsing: valid attributes make a plugin; each value the kernel cannot run is refused.
  Fields good;
  IPluginV3* plugin = creator->createPlugin("fc1", good.make(), TensorRTPhase::kBUILD);
  CHECK(plugin != nullptr);
  CHECK(serialized(plugin) == "K=2048 N=8192 group_size=128 bits=4 layout=kernel_v1");
  for (int32_t bad = 0; bad < 4; ++bad) {
    Fields fields;
    if (bad == 0) fields.bits = 8;
    if (bad == 1) fields.groupSize = 64;
    if (bad == 2) fields.k = 1000;
    if (bad == 3) fields.layout = "canonical";
    CHECK(creator->createPlugin("bad", fields.make(), TensorRTPhase::kBUILD) == nullptr);
  }

  // Serialization round trip: the fields an engine stores recreate the same plugin at runtime; so does clone.
  auto* saved = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
                    ->getFieldsToSerialize();
  IPluginV3* restored = creator->createPlugin("fc1", saved, TensorRTPhase::kRUNTIME);
  CHECK(restored != nullptr && serialized(restored) == serialized(plugin));
  IPluginV3* cloned = plugin->clone();
  CHECK(cloned != nullptr && serialized(cloned) == serialized(plugin));

  auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
  CHECK(std::strcmp(core->getPluginName(), "W4A16MatMul") == 0 && std::strcmp(core->getPluginNamespace(), "qvggt") == 0);
  auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
  CHECK(build->getNbOutputs() == 1);
  DataType const inputTypes[] = {DataType::kHALF, DataType::kINT8, DataType::kHALF, DataType::kHALF};
  DataType outputType = DataType::kFLOAT;
  CHECK(build->getOutputDataTypes(&outputType, 1, inputTypes, 4) == 0 && outputType == DataType::kHALF);

  // X, weight, scales, bias, Y: fp16 / int8 kernel_v1 / fp16 / fp16 / fp16, linear; nothing else.
  std::vector<DynamicPluginTensorDesc> io = {
      tensor(DataType::kHALF, {4, 1374, 2048}), tensor(DataType::kINT8, {1024, 16, 512}),
      tensor(DataType::kHALF, {16, 8192}), tensor(DataType::kHALF, {8192}), tensor(DataType::kHALF, {4, 1374, 8192})};
  for (int32_t pos = 0; pos < 5; ++pos) CHECK(build->supportsFormatCombination(pos, io.data(), 4, 1));
  io[0].desc.type = DataType::kFLOAT;
  CHECK(!build->supportsFormatCombination(0, io.data(), 4, 1));
  io[0].desc.type = DataType::kHALF;
  io[1].desc.type = DataType::kINT32;  // what the parser would make of a UINT8 initializer
  CHECK(!build->supportsFormatCombination(1, io.data(), 4, 1));
  io[1].desc.type = DataType::kINT8;
  io[4].desc.format = TensorFormat::kHWC8;
  CHECK(!build->supportsFormatCombination(4, io.data(), 4, 1));
  io[4].desc.format = TensorFormat::kLINEAR;

  CHECK(build->configurePlugin(io.data(), 4, io.data() + 4, 1) == 0);
  io[1] = tensor(DataType::kINT8, {8192, 16, 64});  // the canonical [N, K/128, 64] packing
  CHECK(build->configurePlugin(io.data(), 4, io.data() + 4, 1) != 0);
  CHECK(build->getWorkspaceSize(io.data(), 4, io.data() + 4, 1) == size_t{8192} * 2048 * 2);

  // The kernel's argument checks (host code; nothing runs on a GPU).
  auto* base = reinterpret_cast<char*>(uintptr_t{1} << 20);
  CHECK(qvggt_w4a16_argument_error(base, base, base, base, 1, 8192, 2048) == nullptr);
  CHECK(qvggt_w4a16_argument_error(base, base, base, nullptr, 1, 8192, 2048) == nullptr);
  CHECK(std::strncmp(qvggt_w4a16_argument_error(base + 8, base, base, base, 1, 8192, 2048), "X must", 6) == 0);
  CHECK(std::strncmp(qvggt_w4a16_argument_error(base, base + 4, base, base, 1, 8192, 2048), "the weight", 10) == 0);
  CHECK(std::strncmp(qvggt_w4a16_argument_error(base, base, base + 2, base, 1, 8192, 2048), "Y must", 6) == 0);
  CHECK(std::strncmp(qvggt_w4a16_argument_error(base, base, base, base + 8, 1, 8192, 2048), "the workspace", 13) == 0);
  CHECK(std::strncmp(qvggt_w4a16_argument_error(base, base, base, base, 1, 8192, 2000), "K must", 6) == 0);

  delete cloned;
  delete restored;
  delete plugin;
  std::printf("harness passed\n");
  return 0;
}
