// TensorRT IPluginV3 for qvggt::W4A16MatMul; see w4a16_plugin.h for the node contract.
#include "w4a16_plugin.h"

#include "w4a16_gemm.cuh"

#include <climits>
#include <cstdio>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <map>
#include <mutex>
#include <utility>

namespace qvggt {
namespace {

constexpr char kPluginName[] = "W4A16MatMul";
constexpr char kPluginNamespace[] = "qvggt";
constexpr char kPluginVersion[] = "1";
constexpr int32_t kInputX = 0;
constexpr int32_t kInputWeight = 1;
constexpr int32_t kInputScales = 2;
constexpr int32_t kInputBias = 3;
constexpr int32_t kTileN = 8;
constexpr int32_t kChunkBytes = 512;

std::mutex gLoggerMutex;
nvinfer1::ILoggerFinder* gLoggerFinder{nullptr};

void logError(char const* message) noexcept {
  std::lock_guard<std::mutex> lock(gLoggerMutex);
  nvinfer1::ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
  char line[512];
  std::snprintf(line, sizeof(line), "%s::%s: %s", kPluginNamespace, kPluginName, message);
  if (logger != nullptr) {
    logger->log(nvinfer1::ILogger::Severity::kERROR, line);
  } else {
    std::fprintf(stderr, "%s\n", line);
  }
}

// One cuBLAS handle per device for every plugin instance in the process (a VGGT-1B engine holds 244
// W4A16MatMul layers per execution context), created by the first attachToContext on that device and
// destroyed with the last instance. cublasSetStream changes the handle for all its users, so it and
// the GEMM it applies to are enqueued under gCublasMutex.
struct SharedCublas {
  cublasHandle_t handle{nullptr};
  int32_t users{0};
};
std::mutex gCublasMutex;
// Never destroyed: plugin instances may outlive static destructors at process exit.
auto* const gCublasHandles = new std::map<int32_t, SharedCublas>();

cublasHandle_t acquireCublas(int32_t device) {
  std::lock_guard<std::mutex> lock(gCublasMutex);
  SharedCublas& shared = (*gCublasHandles)[device];
  if (shared.handle == nullptr && cublasCreate(&shared.handle) != CUBLAS_STATUS_SUCCESS) {
    shared.handle = nullptr;
    return nullptr;
  }
  ++shared.users;
  return shared.handle;
}

void releaseCublas(int32_t device) {
  std::lock_guard<std::mutex> lock(gCublasMutex);
  auto const found = gCublasHandles->find(device);
  if (found == gCublasHandles->end() || --found->second.users > 0) return;
  cublasDestroy(found->second.handle);
  gCublasHandles->erase(found);
}

// nullptr when the kernel can run these attributes, else why not.
char const* attributeError(W4A16Attributes const& a) {
  if (a.bits != 4) return "bits must be 4";
  if (a.groupSize != QVGGT_W4A16_GROUP_SIZE) return "group_size must be 128";
  if (a.layout != QVGGT_W4A16_KERNEL_LAYOUT) {
    return "layout must be kernel_v1 (convert the weights with qvggt_export.kernels.to_kernel_layout)";
  }
  if (a.n < kTileN || a.n % kTileN != 0) return "N must be a positive multiple of 8";
  if (a.k < QVGGT_W4A16_GROUP_SIZE || a.k % QVGGT_W4A16_GROUP_SIZE != 0) return "K must be a positive multiple of 128";
  return nullptr;
}

bool dimsEqual(nvinfer1::Dims const& dims, std::initializer_list<int64_t> expected) {
  if (dims.nbDims != static_cast<int32_t>(expected.size())) return false;
  int32_t i = 0;
  for (int64_t value : expected) {
    if (dims.d[i++] != value) return false;
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// W4A16MatMulPlugin

W4A16MatMulPlugin::W4A16MatMulPlugin(W4A16Attributes attributes) : mAttributes(std::move(attributes)) {
  using nvinfer1::PluginField;
  using nvinfer1::PluginFieldType;
  // The fields point into mAttributes; the plugin is neither copied nor moved, so they stay valid.
  mSerializedFields = {
      PluginField("K", &mAttributes.k, PluginFieldType::kINT32, 1),
      PluginField("N", &mAttributes.n, PluginFieldType::kINT32, 1),
      PluginField("group_size", &mAttributes.groupSize, PluginFieldType::kINT32, 1),
      PluginField("bits", &mAttributes.bits, PluginFieldType::kINT32, 1),
      PluginField("layout", mAttributes.layout.c_str(), PluginFieldType::kCHAR,
                  static_cast<int32_t>(mAttributes.layout.size() + 1)),
  };
  mSerializedCollection.nbFields = static_cast<int32_t>(mSerializedFields.size());
  mSerializedCollection.fields = mSerializedFields.data();
}

W4A16MatMulPlugin::~W4A16MatMulPlugin() {
  if (mCublas != nullptr) releaseCublas(mDevice);
}

nvinfer1::IPluginCapability* W4A16MatMulPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

nvinfer1::IPluginV3* W4A16MatMulPlugin::clone() noexcept {
  try {
    return new W4A16MatMulPlugin(mAttributes);
  } catch (std::exception const& error) {
    logError(error.what());
  }
  return nullptr;
}

char const* W4A16MatMulPlugin::getPluginName() const noexcept { return kPluginName; }
char const* W4A16MatMulPlugin::getPluginVersion() const noexcept { return kPluginVersion; }
char const* W4A16MatMulPlugin::getPluginNamespace() const noexcept { return kPluginNamespace; }

int32_t W4A16MatMulPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                           nvinfer1::DynamicPluginTensorDesc const* /*out*/,
                                           int32_t nbOutputs) noexcept {
  if (nbInputs < 3 || nbInputs > 4 || nbOutputs != 1) {
    logError("expects inputs (X, weight, scales[, bias]) and one output");
    return -1;
  }
  int64_t const k = mAttributes.k;
  int64_t const n = mAttributes.n;
  if (!dimsEqual(in[kInputWeight].desc.dims, {n / kTileN, k / QVGGT_W4A16_GROUP_SIZE, kChunkBytes})) {
    logError("weight must have shape [N/8, K/128, 512] (kernel_v1)");
    return -1;
  }
  if (!dimsEqual(in[kInputScales].desc.dims, {k / QVGGT_W4A16_GROUP_SIZE, n})) {
    logError("scales must have shape [K/128, N]");
    return -1;
  }
  if (nbInputs > kInputBias && !dimsEqual(in[kInputBias].desc.dims, {n})) {
    logError("bias must have shape [N]");
    return -1;
  }
  mHasBias = nbInputs > kInputBias;
  return 0;
}

int32_t W4A16MatMulPlugin::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                                              nvinfer1::DataType const* /*inputTypes*/,
                                              int32_t /*nbInputs*/) const noexcept {
  if (nbOutputs != 1) return -1;
  outputTypes[0] = nvinfer1::DataType::kHALF;
  return 0;
}

int32_t W4A16MatMulPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                                           nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/,
                                           nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                                           nvinfer1::IExprBuilder& exprBuilder) noexcept {
  if (nbInputs < 3 || nbOutputs != 1 || inputs[kInputX].nbDims < 1) return -1;
  nvinfer1::DimsExprs const& x = inputs[kInputX];
  nvinfer1::IDimensionExpr const* channels = x.d[x.nbDims - 1];
  if (channels->isConstant() && channels->getConstantValue() != mAttributes.k) {
    logError("the last dimension of X must equal K");
    return -1;
  }
  outputs[0] = x;
  outputs[0].d[x.nbDims - 1] = exprBuilder.constant(mAttributes.n);
  return 0;
}

bool W4A16MatMulPlugin::supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
                                                  int32_t /*nbInputs*/, int32_t /*nbOutputs*/) noexcept {
  nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
  nvinfer1::DataType const wanted = pos == kInputWeight ? nvinfer1::DataType::kINT8 : nvinfer1::DataType::kHALF;
  return desc.format == nvinfer1::TensorFormat::kLINEAR && desc.type == wanted;
}

int32_t W4A16MatMulPlugin::getNbOutputs() const noexcept { return 1; }

size_t W4A16MatMulPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
                                           nvinfer1::DynamicPluginTensorDesc const* /*outputs*/,
                                           int32_t /*nbOutputs*/) const noexcept {
  return qvggt_w4a16_workspace_bytes(mAttributes.n, mAttributes.k);
}

int32_t W4A16MatMulPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* /*in*/, int32_t nbInputs,
                                         nvinfer1::PluginTensorDesc const* /*out*/, int32_t /*nbOutputs*/) noexcept {
  mHasBias = nbInputs > kInputBias;
  return 0;
}

int32_t W4A16MatMulPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
                                   nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs,
                                   void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
  nvinfer1::Dims const& xDims = inputDesc[kInputX].dims;
  int64_t rows = 1;
  for (int32_t i = 0; i + 1 < xDims.nbDims; ++i) rows *= xDims.d[i];
  if (rows == 0) return 0;
  if (rows > INT_MAX) {
    logError("X has more rows than the kernel can index");
    return -1;
  }
  int32_t const m = static_cast<int32_t>(rows);
  int32_t const n = mAttributes.n;
  int32_t const k = mAttributes.k;
  auto const* x = static_cast<__half const*>(inputs[kInputX]);
  auto const* weight = static_cast<int8_t const*>(inputs[kInputWeight]);
  auto const* scales = static_cast<__half const*>(inputs[kInputScales]);
  auto const* bias = mHasBias ? static_cast<__half const*>(inputs[kInputBias]) : nullptr;
  auto* y = static_cast<__half*>(outputs[0]);
  if (char const* error = qvggt_w4a16_argument_error(x, weight, y, workspace, m, n, k)) {
    logError(error);
    return -1;
  }

  if (qvggt_w4a16_use_fused(m, n, k) != 0) {
    cudaError_t const status =
        qvggt_w4a16_fused(x, weight, scales, bias, y, m, n, k, workspace, qvggt_w4a16_workspace_bytes(n, k), stream);
    if (status != cudaSuccess) {
      logError(qvggt_w4a16_error_string(status));
      return -1;
    }
    return 0;
  }

  // Large M: W in fp16 into the workspace, then Y = X · Wᵀ (+ bias) with cuBLAS. Row-major Y [m, n] is
  // column-major Yᵀ [n, m] = op_T(W as column-major [k, n]) · (X as column-major [k, m]).
  if (mCublas == nullptr) {
    logError("no cuBLAS handle (the plugin was not attached to an execution context)");
    return -1;
  }
  auto* weightFp16 = static_cast<__half*>(workspace);
  cudaError_t status = qvggt_w4a16_dequantize(weight, scales, weightFp16, n, k, stream);
  float const alpha = 1.0F;
  float beta = 0.0F;
  if (status == cudaSuccess && bias != nullptr) {
    status = qvggt_w4a16_fill_bias(bias, y, m, n, stream);
    beta = 1.0F;
  }
  if (status != cudaSuccess) {
    logError(qvggt_w4a16_error_string(status));
    return -1;
  }
  cublasStatus_t gemm = CUBLAS_STATUS_SUCCESS;
  {
    std::lock_guard<std::mutex> lock(gCublasMutex);
    gemm = cublasSetStream(mCublas, stream);
    if (gemm == CUBLAS_STATUS_SUCCESS) {
      gemm = cublasGemmEx(mCublas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, weightFp16, CUDA_R_16F, k, x,
                          CUDA_R_16F, k, &beta, y, CUDA_R_16F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    }
  }
  if (gemm != CUBLAS_STATUS_SUCCESS) {
    logError("cublasGemmEx failed");
    return -1;
  }
  return 0;
}

nvinfer1::IPluginV3* W4A16MatMulPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept {
  auto* attached = static_cast<W4A16MatMulPlugin*>(clone());
  if (attached == nullptr) return nullptr;
  attached->mHasBias = mHasBias;
  if (cudaGetDevice(&attached->mDevice) != cudaSuccess ||
      (attached->mCublas = acquireCublas(attached->mDevice)) == nullptr) {
    logError("no CUDA device or cublasCreate failed");
    delete attached;
    return nullptr;
  }
  return attached;
}

nvinfer1::PluginFieldCollection const* W4A16MatMulPlugin::getFieldsToSerialize() noexcept {
  return &mSerializedCollection;
}

// ---------------------------------------------------------------------------------------------
// W4A16MatMulPluginCreator

W4A16MatMulPluginCreator::W4A16MatMulPluginCreator() {
  using nvinfer1::PluginField;
  using nvinfer1::PluginFieldType;
  mFieldNames = {
      PluginField("K", nullptr, PluginFieldType::kINT32, 1),
      PluginField("N", nullptr, PluginFieldType::kINT32, 1),
      PluginField("group_size", nullptr, PluginFieldType::kINT32, 1),
      PluginField("bits", nullptr, PluginFieldType::kINT32, 1),
      PluginField("layout", nullptr, PluginFieldType::kCHAR, 0),
  };
  mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
  mFieldCollection.fields = mFieldNames.data();
}

char const* W4A16MatMulPluginCreator::getPluginName() const noexcept { return kPluginName; }
char const* W4A16MatMulPluginCreator::getPluginVersion() const noexcept { return kPluginVersion; }
char const* W4A16MatMulPluginCreator::getPluginNamespace() const noexcept { return kPluginNamespace; }

nvinfer1::PluginFieldCollection const* W4A16MatMulPluginCreator::getFieldNames() noexcept {
  return &mFieldCollection;
}

nvinfer1::IPluginV3* W4A16MatMulPluginCreator::createPlugin(char const* /*name*/,
                                                            nvinfer1::PluginFieldCollection const* fc,
                                                            nvinfer1::TensorRTPhase /*phase*/) noexcept {
  try {
    W4A16Attributes attributes;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
      nvinfer1::PluginField const& field = fc->fields[i];
      if (field.type == nvinfer1::PluginFieldType::kINT32 && field.length >= 1) {
        int32_t const value = *static_cast<int32_t const*>(field.data);
        if (std::strcmp(field.name, "K") == 0) attributes.k = value;
        if (std::strcmp(field.name, "N") == 0) attributes.n = value;
        if (std::strcmp(field.name, "group_size") == 0) attributes.groupSize = value;
        if (std::strcmp(field.name, "bits") == 0) attributes.bits = value;
      } else if (field.type == nvinfer1::PluginFieldType::kCHAR && std::strcmp(field.name, "layout") == 0) {
        auto const* text = static_cast<char const*>(field.data);
        attributes.layout.assign(text, strnlen(text, static_cast<size_t>(field.length)));
      }  // other fields (the node's annotations) are not the plugin's business
    }
    if (char const* error = attributeError(attributes)) {
      logError(error);
      return nullptr;
    }
    return new W4A16MatMulPlugin(std::move(attributes));
  } catch (std::exception const& error) {
    logError(error.what());
  }
  return nullptr;
}

}  // namespace qvggt

// ---------------------------------------------------------------------------------------------
// Library entry points

extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  std::lock_guard<std::mutex> lock(qvggt::gLoggerMutex);
  qvggt::gLoggerFinder = finder;
}

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static qvggt::W4A16MatMulPluginCreator creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}

extern "C" bool qvggtInitPlugins() {
  static bool const registered = [] {
    int32_t count = 0;
    nvinfer1::IPluginCreatorInterface* const* creators = getCreators(count);
    return getPluginRegistry()->registerCreator(*creators[0], qvggt::kPluginNamespace);
  }();
  return registered;
}
